"""Per-piece torch references for validation, built one piece at a time from the checkpoint.

A reference never holds the whole model: a layer reference materializes that layer's weights
only; the embed/head reference holds the small head modules plus the embedding and lm_head in
their stored export dtype, upcast chunk by chunk when used (a 248K x 4096 float64 copy would be
8 GB). Weights are the export's: the checkpoint tensor cast to the export dtype, then to the
reference's compute dtype, so a comparison measures the graph's arithmetic, not weight rounding.
The reference kernels are the torch ones (transformers' delta rule, plain attention and conv),
whatever lowering the export used.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipo_graphs.contract import Mode

from pipo_export.export.pieces import LayerOwner, PieceSet
from pipo_export.model.checkpoint import materialize, skeleton
from pipo_export.model.config import PipoConfig
from pipo_export.model.layers import Kernels
from pipo_export.model.regular import step_class

CHUNK_ROWS = 8192  # lm_head rows upcast at a time


class UpcastEmbedding(nn.Module):
    """Embedding whose weight stays in its stored dtype; looked-up rows are cast to `dtype`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.weight, self.dtype = weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., H] in `dtype`."""
        return F.embedding(ids, self.weight).to(self.dtype)


class UpcastLinear(nn.Module):
    """x @ W.T in x's dtype with W kept in its stored dtype, CHUNK_ROWS output rows at a time."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., V]."""
        return torch.cat([x @ w.to(x.dtype).T for w in self.weight.split(CHUNK_ROWS)], dim=-1)


class _AsExported:
    """A TensorSource view: each weight as the export computes with it (cast to the export
    dtype; quantized ones dequantized), then in `dtype`."""

    def __init__(self, reader, dtype: torch.dtype):
        self.reader, self.dtype = reader, dtype

    def get(self, name: str) -> torch.Tensor:
        return self.reader.reference(name, self.dtype)


class References:
    """Reference pieces (torch kernels) in a compute dtype, weights read on demand."""

    HEAD_MODULES = ("model.norm", "compressor", "mtp", "confidence_head")

    def __init__(self, cfg: PipoConfig, reader, mode: Mode, dtype: torch.dtype,
                 big: dict | None = None):
        """reader: the export's WeightReader (weights as exported); big: a dict shared between
        References of one export, holding the embedding and lm_head once."""
        self.cfg, self.source, self.dtype = cfg, reader.source, dtype
        self.reader, self.export_dtype = reader, reader.dtype
        self.big = {} if big is None else big
        self.cast = _AsExported(reader, dtype)
        self.meta = skeleton(cfg)
        self.mode = Mode(mode)
        self._step = None

    def layer(self, index: int) -> LayerOwner:
        """Layer `index` with its weights, as the owner its pieces take."""
        layer = copy.deepcopy(self.meta.model.layers[index])
        materialize(layer, self.cast, self.dtype, prefix=f"model.layers.{index}.")
        return LayerOwner(layer)

    def step(self):
        """The embed/head owner: a PipoStep (RegularStep) with the head modules materialized."""
        if self._step is None:
            model = copy.deepcopy(self.meta)
            model.model.layers = nn.ModuleList()  # the references never run layers here
            for name in self.HEAD_MODULES:
                materialize(model.get_submodule(name), self.cast, self.dtype, prefix=name + ".")
            embed = self._big("model.embed_tokens.weight", matmul=False)
            model.model.embed_tokens = UpcastEmbedding(embed, self.dtype)
            tied = self.cfg.text.tie_word_embeddings
            model.lm_head = UpcastLinear(self._big("model.embed_tokens.weight" if tied else
                                                   "lm_head.weight", matmul=True))
            self._step = step_class(self.mode)(model, kernels=Kernels())
        return self._step

    def _big(self, name: str, matmul: bool) -> torch.Tensor:
        """The embedding (gather: exact) or lm_head (matmul: dequantized when quantized), held
        once in the export dtype; equal tensors are shared."""
        if (name, matmul) not in self.big:
            value = self.reader.reference(name, self.export_dtype, matmul)
            same = [v for (n, _), v in self.big.items() if n == name and torch.equal(v, value)]
            self.big[name, matmul] = same[0] if same else value
        return self.big[name, matmul]

    def pieces(self, sample_cap: int) -> PieceSet:
        """Piece functions (I/O as the traced ones) over the reference kernels."""
        step = step_class(self.mode)(self.meta, kernels=Kernels(), sample_cap=sample_cap)
        return PieceSet(step, self.dtype)
