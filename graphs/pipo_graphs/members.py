"""Files of an export folder: the one rule for which paths a runtime may open.

A name in the manifest (a graph file, the weights file, an entry of `files`, an external-data
location) is a plain relative path: not absolute, no `..`, no empty or `.` parts. The path it
names, with every symlink resolved, must stay inside the folder and be a regular file. One
exception keeps a Hugging Face cache usable: when the folder is `models--X/snapshots/REV`,
files may resolve into that repository's `models--X/blobs/` (where the hub stores what the
snapshot's symlinks point to).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import ManifestError


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """The resolved folders a member of `folder` may resolve into (see the module doc)."""
    root = folder.resolve()
    snapshots = root.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return root, snapshots.parent / "blobs"
    return (root,)


def check_name(name: str, what: str = "file") -> str:
    """`name` when it is a plain relative path (ManifestError naming it otherwise)."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not isinstance(name, str) or not name or "\\" in name or "\0" in name
            or name.startswith("/") or any(p in ("..", ".") for p in parts)
            or name != "/".join(parts)):
        raise ManifestError(f"manifest {what} {name!r} is not a plain relative path inside the "
                            "export folder (absolute, '..' or empty); re-export")
    return name


def member(folder: Path, name: str, what: str = "file") -> Path:
    """folder/name once `name` is a plain relative path whose target (symlinks resolved) is a
    regular file inside the folder (ManifestError otherwise). The returned path is the
    resolved one, so a symlink swapped after this check cannot redirect the read."""
    folder = Path(folder)
    check_name(name, what)
    path = folder / name
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise ManifestError(f"{folder}: {what} {name} listed in the manifest is missing; "
                            "re-export") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ManifestError(f"{folder}: {what} {name} cannot be resolved ({exc}); "
                            "re-export") from None
    if not any(target.is_relative_to(root) for root in allowed_roots(folder)):
        raise ManifestError(f"{folder}: {what} {name} is a symlink to {target}, outside the "
                            "export folder; copy the file into the folder")
    if not target.is_file():
        raise ManifestError(f"{folder}: {what} {name} is not a regular file; re-export")
    return target
