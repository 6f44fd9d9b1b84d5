"""`pipo-export bench` (run, measure); the peers bench lives in benchmarks/peers (not shipped)."""
from __future__ import annotations

from pathlib import Path


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in `folder` (an export or a peer's model folder)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
