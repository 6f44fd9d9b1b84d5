"""Sealed JSON files: `manifest.json` is only read when its bytes match the sha256 in
`manifest.sha256` beside it (`sha256sum -c` format, so `sha256sum -c manifest.sha256` checks it
too); `build` seals engines.json the same way. Both runtimes verify the seal before parsing."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import ManifestError

SEAL_SUFFIX = ".sha256"  # manifest.json -> manifest.sha256


def seal_path(path: Path) -> Path:
    """The checksum file that protects a JSON file: manifest.json -> manifest.sha256."""
    return path.with_name(path.stem + SEAL_SUFFIX)


def write_sealed(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` and its sha256 to seal_path(path) (`sha256sum -c`
    verifies it)."""
    data = text.encode()
    path.write_bytes(data)
    seal_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")


def read_sealed(path: Path) -> str:
    """The text of `path` once its bytes match the sha256 in seal_path(path); ManifestError
    (one line: the file, the problem, the fix) when the seal is missing, malformed or
    different."""
    seal = seal_path(path)
    try:
        data, line = path.read_bytes(), seal.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{exc.filename}: missing; {path.name} is only read with its "
                            f"checksum file {seal.name} beside it (re-export)") from None
    except IsADirectoryError as exc:
        raise ManifestError(f"{exc.filename}: is a folder, expected a file; re-export") from None
    except OSError as exc:
        raise ManifestError(f"{exc.filename}: cannot be read ({exc.strerror})") from None
    want = line.split(b" ", 1)[0].strip().decode("ascii", "replace")
    if line.rstrip(b"\n") != f"{want}  {path.name}".encode() or len(want) != 64:
        raise ManifestError(f"{seal}: not a sha256 line for {path.name} (corrupted); re-export")
    if hashlib.sha256(data).hexdigest() != want:
        raise ManifestError(f"{path}: does not match its sha256 in {seal.name} (the file was "
                            "changed or corrupted); re-export")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


