"""manifest.json: the single description of an export (schema: manifest.schema.json)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .contract import CONTRACT_VERSION, DECODE, PREFILL
from .errors import PipoUserError

MANIFEST = "manifest.json"
SCHEMA = Path(__file__).with_name("manifest.schema.json")


class ManifestError(PipoUserError):
    """The export folder's manifest is missing, malformed, from another contract, or its files
    do not match their checksums."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict:
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
            for n in sorted(names)}


def _check_schema(data: dict, schema: dict, where: str) -> None:
    """The subset of JSON Schema this file uses: required keys, const, enum."""
    for key in schema.get("required", []):
        if key not in data:
            raise ManifestError(f"{where}: missing '{key}'")
    for key, sub in schema.get("properties", {}).items():
        if key not in data:
            continue
        value = data[key]
        if "const" in sub and value != sub["const"]:
            raise ManifestError(f"{where}.{key} is {value!r}, expected {sub['const']!r}")
        if "enum" in sub and value not in sub["enum"]:
            raise ManifestError(f"{where}.{key} is {value!r}, expected one of {sub['enum']}")
        if isinstance(value, dict) and sub.get("type") == "object":
            _check_schema(value, sub, f"{where}.{key}")


def load_manifest(folder: str | Path, verify_files: bool = True) -> dict:
    """Read and check folder/manifest.json: schema, contract version, and (by default) that
    every listed file exists with its recorded sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST}; not a pipo-export export folder "
                            "(make one with: pipo-export export CKPT -o OUT)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    _check_schema(data, json.loads(SCHEMA.read_text()), "manifest")
    major = str(data["contract_version"]).split(".")[0]
    if major != CONTRACT_VERSION.split(".")[0]:
        raise ManifestError(f"{path}: graph contract {data['contract_version']}, this runtime "
                            f"reads {CONTRACT_VERSION}; re-export with this pipo-export version")
    for graph in (PREFILL, DECODE):
        if graph not in data["graphs"]:
            raise ManifestError(f"{path}: no graph '{graph}'")
    if verify_files:
        verify_checksums(folder, data)
    return data


def verify_checksums(folder: Path, manifest: dict) -> None:
    for name, entry in manifest["files"].items():
        f = folder / name
        if not f.is_file():
            raise ManifestError(f"{folder}: file {name} listed in the manifest is missing")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest "
                                "(corrupted or swapped file); re-export")
