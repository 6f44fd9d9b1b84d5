"""Read JSON inputs with one-line errors; write output folders atomically: build in a
temporary sibling, rename at the end.

A temporary sibling is named `.OUT.tmp-PID-XXXXXXXX` after the process that owns it. Every new
write of OUT first removes the siblings whose process is gone (a run killed by SIGKILL or a
power cut), so none survives a rerun; SIGINT and SIGTERM unwind normally (the CLI turns SIGTERM
into KeyboardInterrupt) and remove their own.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipo_export.errors import PipoError


def read_json_object(path: Path, missing: dict | None = None) -> dict:
    """The JSON object in `path`; `missing` (when given) if there is no such file. A file that
    is missing, unreadable, not UTF-8, not JSON or not an object raises PipoError (one line)."""
    path = Path(path)
    if missing is not None and not path.exists():
        return missing
    try:
        data = json.loads(path.read_bytes().decode())
    except FileNotFoundError:
        raise PipoError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PipoError(f"{path}: is a folder, expected a JSON file") from None
    except OSError as exc:
        raise PipoError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise PipoError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PipoError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise PipoError(f"{path}: JSON nesting too deep") from None
    if not isinstance(data, dict):
        raise PipoError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_checkpoint_json(path: Path, missing: dict | None = None) -> dict:
    """read_json_object for a file of a checkpoint or adapter folder: CheckpointError."""
    from pipo_export.errors import CheckpointError
    try:
        return read_json_object(path, missing)
    except PipoError as exc:
        raise CheckpointError(str(exc)) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` siblings whose PID is not a live process, older unnamed ones
    (`.NAME.tmp-XXXXXXXX`, from before the PID was recorded) and `.NAME.old`; -> the removed."""
    removed = []
    for path in parent.glob(f".{name}.tmp-*"):
        pid = path.name[len(f".{name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and "-" in path.name[len(f".{name}.tmp-"):] and _alive(int(pid)):
            continue
        _remove(path)
        removed.append(path)
    old = parent / f".{name}.old"
    if old.exists() or old.is_symlink():
        _remove(old)
        removed.append(old)
    return removed


def make_temp(parent: Path, name: str) -> Path:
    """A new empty `.NAME.tmp-PID-XXXXXXXX` folder in `parent`, after removing stale ones."""
    remove_stale(parent, name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent))


def umask_mode(mode: int = 0o777) -> int:
    """`mode` as the process umask lets a new folder have it."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    """Yield a temporary folder that becomes `out` only if the block finishes.

    A failure, Ctrl-C or SIGTERM leaves `out` as it was (absent, or the previous content) and
    nothing beside it; `out` gets the mode a plain mkdir would (the umask), not mkdtemp's 0700.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise PipoError(f"{out} already exists; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PipoError(f"{out}: a part of the path is a file, not a folder; choose another "
                        "output folder") from None
    tmp = make_temp(out.parent, out.name)
    try:
        yield tmp
        tmp.chmod(umask_mode())
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
