"""Declarative I/O of the two graphs (optimum style): names, dtypes, symbolic dims.

Built from the contract in pipo_graphs; the tracer, the manifest and `check` all read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipo_graphs.contract import (CONFIDENCE, DECODE, INPUT_IDS, INPUT_PAIR, LENGTHS, ModelDims,
    NEXT_TOKEN, PAIR, PAST, PREFILL, PRESENT, SAMPLING_INPUTS, StateSpec, UNIFORMS, state_specs)
from pipo_graphs.dtypes import DType

from pipo_export.model.modules import PipoModel

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints, or symbolic dim names

    def rename(self, name: str) -> "TensorSpec":
        return TensorSpec(name, self.dtype, self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def model_dims(model: PipoModel) -> ModelDims:
    t = model.config.text
    gdn = next((l.linear_attn for l in model.model.layers if l.block_type == "linear_attention"),
               None)
    return ModelDims(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                     layer_types=list(t.layer_types), num_key_value_heads=t.num_key_value_heads,
                     head_dim=t.head_dim, conv_dim=gdn.conv_dim if gdn else 0,
                     conv_kernel=t.linear_conv_kernel_dim,
                     linear_num_value_heads=t.linear_num_value_heads,
                     linear_key_head_dim=t.linear_key_head_dim,
                     linear_value_head_dim=t.linear_value_head_dim)


def _sampling() -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, dt, ("batch",)) for n, dt in SAMPLING_INPUTS) + (
        TensorSpec(UNIFORMS, "float32", ("batch", 2)),)


def graph_specs(dims: ModelDims, dtype: str, mtp: bool = True
                ) -> tuple[GraphSpec, GraphSpec, list[StateSpec]]:
    """-> (prefill spec, decode spec, states). The prefill continues past states: its outputs
    hold past_pairs + prompt_pairs slots (PIPO) or past_pairs + 2*prompt_pairs slots (regular
    decoding, mtp=False: one token per slot)."""
    states = state_specs(dims, DType(dtype).value, mtp)
    slots = "past_pairs + prompt_pairs" if mtp else "past_pairs + 2*prompt_pairs"
    head = (TensorSpec(PAIR, "int64", ("batch", 2)), TensorSpec(CONFIDENCE, "float32", ("batch",)))

    def with_dim(shape, old, new):
        return tuple(new if d == old else d for d in shape)

    prefill = GraphSpec(
        PREFILL,
        (TensorSpec(INPUT_IDS, "int64", ("batch", "2*prompt_pairs")),
         TensorSpec(LENGTHS, "int64", ("batch",)))
        + tuple(TensorSpec(PAST + s.name, s.dtype, s.shape) for s in states)
        + (TensorSpec(NEXT_TOKEN, "int64", ("batch",)),) + _sampling(),
        head + tuple(TensorSpec(PRESENT + s.name, s.dtype, with_dim(s.shape, "past_pairs", slots))
                     for s in states))
    decode = GraphSpec(
        DECODE,
        (TensorSpec(INPUT_PAIR, "int64", ("batch", 2)),)
        + tuple(TensorSpec(PAST + s.name, s.dtype, s.shape) for s in states) + _sampling(),
        head + tuple(TensorSpec(PRESENT + s.name, s.dtype, with_dim(s.shape, "past_pairs",
                                                                     "past_pairs + 1"))
                     for s in states))
    return prefill, decode, states
