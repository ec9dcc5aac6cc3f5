"""Writing output files safely. Every file a command writes is checked with :func:`check_output` before any work
is done (so a bad path fails in a second, not after the computation) and written with :func:`write_atomically`:
built in a hidden temporary file beside the target, then moved into place, so a reader never sees half a file and
a failure (full disk, SIGTERM) leaves nothing behind. Without ``overwrite`` the move is an exclusive create, so of
two runs racing for one name exactly one wins and the other fails with one line."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from medldm.errors import MedldmError

__all__ = [
    "check_output",
    "check_output_folder",
    "check_distinct",
    "write_atomically",
    "write_text",
    "write_bytes",
    "is_temporary",
    "strip_suffix",
    "NIFTI_SUFFIXES",
    "TEMPORARY_MARK",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TEMPORARY_MARK = ".partial"
NAME_MAX = 255  # bytes in one path component on the usual file systems


def strip_suffix(name: str, suffixes: Iterable[str]) -> tuple[str, str]:
    """(stem, suffix) of ``name`` for the longest matching suffix, compared case-insensitively."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return name, ""


def _temporary(path: Path, suffixes: Iterable[str]) -> Path:
    # the real suffix stays last: writers (nibabel, matplotlib) pick the format from it
    _, suffix = strip_suffix(path.name, suffixes)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_MARK}{suffix}")


def is_temporary(path: Path) -> bool:
    """A temporary file of :func:`write_atomically` (left only by a killed process), or another hidden file."""
    return path.name.startswith(".")


def check_output(
    path: str | os.PathLike, *, overwrite: bool = False, suffixes: Iterable[str] = NIFTI_SUFFIXES, what: str = "output"
) -> Path:
    """Refuse, with one line naming the path, an output that could not be written: a wrong suffix, an existing
    file (without ``overwrite``) or folder, a parent that is a file or not writable, or a name too long for its
    temporary file."""
    path, suffixes = Path(path), tuple(suffixes)
    if not strip_suffix(path.name, suffixes)[1]:
        raise MedldmError(f"{what} must end in {' or '.join(suffixes)}", path)
    if path.is_dir():
        raise MedldmError("is a folder", path)
    if path.exists() and not overwrite:
        raise MedldmError("already exists; pass --overwrite to replace it", path)
    if len(_temporary(path, suffixes).name.encode()) > NAME_MAX:
        raise MedldmError(f"file name is too long: its temporary file would pass {NAME_MAX} bytes", path)
    _check_parent(path)
    return path


def check_output_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """:func:`check_output` for an output that is a folder (a DICOM series): an existing folder only with
    ``overwrite``, never over a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedldmError("is a file; a DICOM series is written as a folder", path)
    if path.exists() and not overwrite:
        raise MedldmError("already exists; pass --overwrite to replace it", path)
    if len(f".{path.name}.01234567{TEMPORARY_MARK}".encode()) > NAME_MAX:
        raise MedldmError(f"folder name is too long: its temporary folder would pass {NAME_MAX} bytes", path)
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        if parent.is_symlink():
            break
        parent = parent.parent
    if not parent.is_dir():
        raise MedldmError(f"cannot write here: {parent} is not a folder", path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MedldmError(f"cannot write here: {parent} is not writable", path)


def check_distinct(paths: Iterable[Path]) -> None:
    """Refuse two outputs of one command at one path (names compared as the file system may: case-folded)."""
    seen: dict[str, Path] = {}
    for path in paths:
        key = os.path.normcase(str(Path(path).resolve())).lower()
        if key in seen:
            raise MedldmError(f"two outputs of this command would share one file ({seen[key]} and {path})", path)
        seen[key] = Path(path)


def write_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], object],  # its return value is ignored
    *,
    overwrite: bool = False,
    suffixes: Iterable[str] = NIFTI_SUFFIXES,
) -> Path:
    """Call ``write(temporary_path)``, then move the file into place at ``path`` (see the module docstring)."""
    path = Path(path)
    tmp = _temporary(path, suffixes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MedldmError("no space left on the device; nothing was written", path) from None
        raise MedldmError(f"cannot be written ({exc.strerror or exc})", path) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _claim(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, atomically."""
    try:
        os.link(tmp, path)  # fails if path exists, whoever created it a moment ago
    except FileExistsError:
        raise MedldmError(
            "already exists (another run wrote it meanwhile?); pass --overwrite to replace it", path
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (some network and FAT file systems): claim the name, then fill it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise MedldmError(
                "already exists (another run wrote it meanwhile?); pass --overwrite to replace it", path
            ) from None
        os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str, *, suffixes: Iterable[str] = ("",)) -> Path:
    """A small text file (reports, sidecars), replaced atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:  # newline="": CSV and HTML exactly as given
            fh.write(text)

    return write_atomically(path, write, overwrite=True, suffixes=suffixes)


def write_bytes(path: str | os.PathLike, data: bytes, *, suffixes: Iterable[str] = ("",)) -> Path:
    """A small binary file (report figures), replaced atomically."""
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=True, suffixes=suffixes)
