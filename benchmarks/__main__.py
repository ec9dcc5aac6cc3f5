"""``python -m benchmarks [--quick] [--only NAME ...]``: run the benchmarks, print their tables and write JSON."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import adapt, brain_1mm, fusion, off_grid, scaling, steps_quality, training, upscale_reference

BENCHMARKS = {
    "upscale_reference": upscale_reference,
    "scaling": scaling,
    "steps_quality": steps_quality,
    "training": training,
    "brain_1mm": brain_1mm,
    "fusion": fusion,
    "off_grid": off_grid,
    "adapt": adapt,
}
# brain_1mm (a whole 1 mm brain with three sampling variants, several minutes), fusion (three stacks of one),
# off_grid (a whole 1 mm brain at x5.5, two variants) and adapt (two adaptations of a clinical scan) run only when
# asked for with --only, so that the default run stays within about 30 minutes on 2 CPU cores
DEFAULT = ["upscale_reference", "scaling", "steps_quality", "training"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes and few settings (about 5 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--out", type=Path, default=Path("bench_output"), help="folder for the JSON results")
    args = parser.parse_args()
    tic = time.perf_counter()
    for name in args.only or DEFAULT:
        start = time.perf_counter()
        BENCHMARKS[name].main(args.quick, args.out)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"all benchmarks: {time.perf_counter() - tic:.0f} s; JSON in {args.out}/", flush=True)


if __name__ == "__main__":
    main()
