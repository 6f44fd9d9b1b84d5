"""`pipo-export tiny OUT`: write a built-in PIPO checkpoint with random weights."""
from __future__ import annotations

import argparse

SHAPE_CHOICES = ("tiny", "small", "qwen3.5-0.8b", "qwen3.5-4b", "qwen3.5-9b")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--shape", choices=SHAPE_CHOICES, default="tiny",
                   help="tiny: hidden 64, 4 layers; small: hidden 256, 8 layers; qwen3.5-*: the "
                        "published text dims, released layout, bf16 shards, written tensor by "
                        "tensor")
    p.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")


def command(ns: argparse.Namespace) -> int:
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
