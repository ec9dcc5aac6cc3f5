"""`make demo`: the main job on a real scan that a package ships, so nothing is downloaded.

The example is the MNI152 2009 T1 template at 1 mm that nilearn's wheel carries. Until the default model
ships, the demo shows the scan and simulates a thick-slice acquisition of it with `medldm degrade`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medldm.errors import MedldmError

OUT = Path("demo_output")
TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def example_scan() -> Path:
    """The MNI152 T1 template file inside the installed nilearn package (found without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MedldmError("nilearn is not installed; it ships the demo scan (pip install nilearn)")
    path = Path(next(iter(spec.submodule_search_locations))) / TEMPLATE
    if not path.exists():
        raise MedldmError("this nilearn version does not ship the MNI152 template", path)
    return path


def main() -> None:
    from medldm.cli import app

    scan = example_scan()
    OUT.mkdir(exist_ok=True)
    lr, hr = OUT / "mni152_lr_z4.nii.gz", OUT / "mni152_hr.nii.gz"
    for args in (["info", str(scan)],
                 ["degrade", str(scan), str(lr), "--axis", "z", "--scale", "4", "--kind", "slice-profile",
                  "--hr-out", str(hr), "--overwrite"],
                 ["info", str(lr)]):
        print(f"\n$ medldm {' '.join(args)}")
        app(args, standalone_mode=False)
    print(f"\nDemo files are in {OUT.resolve()}/ (open them over each other in ITK-SNAP or 3D Slicer).")


if __name__ == "__main__":
    main()
