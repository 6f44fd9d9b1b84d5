"""`pipo-export tiny OUT`: write a built-in PIPO checkpoint with random weights."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.fsutil import atomic_dir
    from pipo_export.model import shapes
    from pipo_export.model.synthetic import SHAPES, with_layers, write_tiny_checkpoint

    with atomic_dir(ns.out, ns.force) as tmp:
        if ns.shape in shapes.SHAPES:  # real dims: tensor by tensor, released layout
            shapes.write_shape_checkpoint(tmp, ns.shape, layers=ns.layers, seed=ns.seed)
        else:
            write_tiny_checkpoint(tmp, seed=ns.seed,
                                  text_config=with_layers(SHAPES[ns.shape], ns.layers))
    print(f"wrote {ns.shape} PIPO checkpoint (seed {ns.seed}) to {ns.out}")
    return 0
