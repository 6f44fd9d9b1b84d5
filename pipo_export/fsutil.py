"""Write output folders atomically: build in a temporary sibling, rename at the end."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from pipo_export.errors import PipoError


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    """Yield a temporary folder that becomes `out` only if the block finishes.

    A failure or Ctrl-C leaves `out` as it was (absent, or the previous content).
    """
    out = Path(out)
    if out.exists() and not force:
        raise PipoError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
