"""`pipo-export tiny OUT`: write a built-in PIPO checkpoint with random weights."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.fsutil import atomic_dir
    from pipo_export.model.synthetic import SHAPES, write_tiny_checkpoint

    with atomic_dir(ns.out, ns.force) as tmp:
        write_tiny_checkpoint(tmp, seed=ns.seed, text_config=SHAPES[ns.shape])
    print(f"wrote {ns.shape} PIPO checkpoint (seed {ns.seed}) to {ns.out}")
    return 0
