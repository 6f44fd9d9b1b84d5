"""The PIPO graph contract: names, shapes and dtypes both compiler and runtimes rely on.

Two graphs, one step each (docs/contract.md, "The two steps"):

prefill_compress
    inputs   input_ids [B, T] int64 (T even, right-padded with PAD), lengths [B] int64 (real
             prompt tokens per row, >= 1), past.<state> for every state (1.1: the states the
             prompt continues; fresh sequences: empty_state_value), next_token [B] int64 (1.1:
             -1, or the first token of the next chunk of a chunked prompt), the sampling inputs
             below, uniforms [B, 2] float32
    outputs  pair [B, 2] int64, confidence [B] float32, present.<state> for every state
             (P_past + T/2 cache slots)
decode_unfold
    inputs   input_pair [B, 2] int64 (the pair emitted last), past.<state> for every state,
             the sampling inputs, uniforms [B, 2] float32
    outputs  pair, confidence, present.<state>

A runtime feeds ``present.X`` of one step as ``past.X`` of the next; it never needs to look
inside a state. States (P = cached pair positions, grows by one per decode step):

    key.<i>, value.<i>      [B, Hkv, P, Dh]  full-attention layer i (keys after RoPE)
    conv.<i>                [B, C, K-1]      Gated DeltaNet layer i causal-conv window
    recurrent.<i>           [B, Hv, Dk, Dv]  Gated DeltaNet layer i state, float32
    mtp_key, mtp_value      [B, Hkv, P, Dh]  the MTP decoder layer
    attention_mask          [B, P] bool      which cache slots hold a real position
    position                [B] int64        pair position of the next step
    prompt_mask             [B, V] bool      tokens seen in the prompt (repetition penalty)
    output_mask             [B, V] bool      tokens generated so far (both penalties)
"""
from __future__ import annotations

import math
import numbers

from dataclasses import dataclass, field
from enum import Enum

from .errors import PipoUserError

CONTRACT_VERSION = "1.1"
CONTINUATION_VERSION = "1.1"  # the first contract whose prefill takes past states
PREFILL = "prefill_compress"
DECODE = "decode_unfold"
PAST = "past."
PRESENT = "present."
# graph inputs besides the states and the sampling inputs
INPUT_IDS, LENGTHS, INPUT_PAIR, NEXT_TOKEN = "input_ids", "lengths", "input_pair", "next_token"
# the states that are not per layer (per-layer ones: state_name(kind, layer))
MTP_KEY, MTP_VALUE = "mtp_key", "mtp_value"
ATTENTION_MASK, POSITION, PROMPT_MASK, OUTPUT_MASK = ("attention_mask", "position",
                                                      "prompt_mask", "output_mask")


class Mode(str, Enum):
    """What an export's graphs compute."""

    PIPO = "pipo"  # pair in, pair out (the model)
    REGULAR = "regular"  # the backbone as a plain causal LM, one token per step (baseline)


class Target(str, Enum):
    """Which runtime an export's graphs are lowered for."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class TargetCaps:
    """What an export target's graphs may hold (read by the exporter and by torch-free `check`)."""

    quantized_weights: bool  # MatMulNBits / GatherBlockQuantized (ONNX Runtime kernels)
    standard_ops_only: bool  # no contrib ops; the graphs must pass TensorRT's parser table
    half_cast_per_use: bool  # float16 weights are cast to float32 at each use (ORT CPU GEMMs)


TARGET_CAPS = {Target.ONNXRUNTIME: TargetCaps(quantized_weights=True, standard_ops_only=False,
                                              half_cast_per_use=True),
               Target.TENSORRT: TargetCaps(quantized_weights=False, standard_ops_only=True,
                                           half_cast_per_use=False)}
# ONNX Runtime's own ops in the ONNX domain (not in the ONNX standard): graphs of targets that are
# not standard_ops_only may hold them; onnx's reference evaluator cannot run them
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def state_name(kind: str, layer: int | None = None) -> str:
    """A state's name: "<kind>.<layer>" for per-layer states (key, value, conv, recurrent),
    the kind itself for the others (mtp_key, attention_mask, position, ...)."""
    return kind if layer is None else f"{kind}.{layer}"


def continues(version: str) -> bool:
    """Whether an export of contract `version` ("major.minor") takes past states at prefill."""
    major, _, minor = version.partition(".")
    want_major, _, want_minor = CONTINUATION_VERSION.partition(".")
    return (int(major), int(minor or 0)) >= (int(want_major), int(want_minor))


def present_to_past(outputs: dict) -> dict:
    """A step's outputs -> the next decode step's state inputs: every present.X as past.X."""
    return {PAST + k[len(PRESENT):]: v for k, v in outputs.items() if k.startswith(PRESENT)}

SAMPLING_INPUTS: tuple[tuple[str, str], ...] = (
    ("temperature", "float32"),
    ("top_k", "int64"),
    ("top_p", "float32"),
    ("min_p", "float32"),
    ("presence_penalty", "float32"),
    ("repetition_penalty", "float32"),
    ("threshold", "float32"),
)
UNIFORMS = "uniforms"
PAIR = "pair"
CONFIDENCE = "confidence"
# Values of the head that are not graph outputs: the exporter's head piece computes them, and they
# stay in both graphs as "head/<name>" (HEAD_SCOPE); validation, the quantization accuracy report
# and `pipo-export eval` expose them (pipo_export.eval.graphs)
HEAD_SCOPE = "head"
LOGITS = "logits"  # token1's logits [B, V] float32
MTP_LOGITS = "mtp_logits"  # token2's logits [B, V] float32 (zeros when the MTP was skipped)
MTP_TOKENS = "mtp_tokens"  # the MTP's input tokens: [B, L] at prefill, [B, 1] (token1) at decode
HEAD_EXTRAS = (LOGITS, MTP_LOGITS, MTP_TOKENS)
DEFAULT_SAMPLE_CAP = 1024  # candidates the in-graph sampler keeps (TopK); greedy sees the full vocab
# weights.data layout: each stored tensor starts at a multiple of this, right after the previous
# one (zero padding only between), once; runtimes refuse any other layout
WEIGHTS_ALIGN = 4096
SKIPPED_CONFIDENCE = -1.0  # confidence reported when tau >= 1 and the confidence head did not run


@dataclass(frozen=True)
class StateSpec:
    """One cache/state tensor: its name, dtype and symbolic shape."""

    name: str
    dtype: str
    shape: tuple  # ints and symbolic dim names ("batch", "past_pairs", ...)
    layer: int | None = None
    kind: str = ""


@dataclass
class SamplingParams:
    """Sampling settings (docs/contract.md, "Sampling"); temperature 0 means greedy.

    Order of application (same in every backend): repetition and presence penalty on the
    logits, temperature, top-k, top-p, min-p over the top `sample_cap` candidates, then
    inverse-CDF selection with the uniform number of the slot.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        """Raise PipoUserError naming the bad field (NaN and infinities included)."""
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise PipoUserError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) \
                or not 0 <= self.top_k < 1 << 63:
            raise PipoUserError(f"top_k must be an integer in [0, 2**63) (0 disables it), got "
                                f"{self.top_k!r}")
        if not self.temperature >= 0:
            raise PipoUserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise PipoUserError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise PipoUserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise PipoUserError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise PipoUserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class ModelDims:
    """The dims of a PIPO model that fix the state shapes."""

    vocab_size: int
    hidden_size: int
    layer_types: list[str]
    num_key_value_heads: int
    head_dim: int
    conv_dim: int
    conv_kernel: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    extra: dict = field(default_factory=dict)


def state_specs(d: ModelDims, cache_dtype: str = "float32", mtp: bool = True) -> list[StateSpec]:
    """Every state of the contract, in graph I/O order. mtp=False: regular-decoding exports
    (no MTP cache; each slot of past_pairs holds one token)."""
    specs: list[StateSpec] = []
    kv = ("batch", d.num_key_value_heads, "past_pairs", d.head_dim)
    for i, kind in enumerate(d.layer_types):
        if kind == "full_attention":
            specs += [StateSpec(state_name("key", i), cache_dtype, kv, i, "attention_key"),
                      StateSpec(state_name("value", i), cache_dtype, kv, i, "attention_value")]
        else:
            specs += [StateSpec(state_name("conv", i), cache_dtype,
                                ("batch", d.conv_dim, d.conv_kernel - 1), i, "conv_window"),
                      StateSpec(state_name("recurrent", i), "float32",
                                ("batch", d.linear_num_value_heads, d.linear_key_head_dim,
                                 d.linear_value_head_dim), i, "recurrent")]
    if mtp:
        specs += [StateSpec(MTP_KEY, cache_dtype, kv, None, MTP_KEY),
                  StateSpec(MTP_VALUE, cache_dtype, kv, None, MTP_VALUE)]
    specs += [StateSpec(ATTENTION_MASK, "bool", ("batch", "past_pairs"), None, ATTENTION_MASK),
              StateSpec(POSITION, "int64", ("batch",), None, POSITION),
              StateSpec(PROMPT_MASK, "bool", ("batch", d.vocab_size), None, PROMPT_MASK),
              StateSpec(OUTPUT_MASK, "bool", ("batch", d.vocab_size), None, OUTPUT_MASK)]
    return specs
