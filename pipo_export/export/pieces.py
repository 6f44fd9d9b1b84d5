"""The traced pieces of the two graphs (declarative I/O, optimum style).

A graph is `embed` -> one `layer` per decoder layer -> `head`. Each piece is traced once, the
layer pieces once per layer type whatever the depth, so tracing time does not grow with the
number of layers. Weights are piece *inputs* named ``w:<parameter>``: the tracer cannot fold them
into constants, and one traced layer serves every layer of its type; the assembler binds them to
the checkpoint's tensors (`Piece.global_name`).

Piece inputs and outputs are named by the values they carry between pieces: graph inputs by
their contract names (``input_ids``, ``past.key``, ...), the rest ``x`` (hidden states),
``valid``/``mask``, ``n_valid``, ``cos``, ``sin``; layer states by kind (``key``, ``conv``, ...)
and head states by name (``mtp_key``, ``output_mask``, ...). Symbolic dims: batch,
prompt_tokens (= 2 * prompt_pairs), prompt_pairs, past_pairs, "past_pairs + 1"; a prefill
continues past states, its caches hold "past_pairs + prompt_pairs" slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipo_graphs.contract import (ATTENTION_MASK, CONFIDENCE, INPUT_IDS, INPUT_PAIR, LENGTHS,
    MTP_KEY, MTP_VALUE, NEXT_TOKEN, OUTPUT_MASK, PAIR, PAST, POSITION, PROMPT_MASK,
    SAMPLING_INPUTS, UNIFORMS)

from pipo_graphs import SamplingParams
from pipo_runtime.requests import sampling_feeds

from pipo_export.export.io_spec import TensorSpec
from pipo_export.model.steps import (FULL_ATTENTION, LAYER_STATES, LOGITS, MTP_LOGITS,
    MTP_TOKENS, PipoStep, layer_decode, layer_prefill)

EXAMPLE_BATCH = 2
EXAMPLE_PROMPT_PAIRS = 130  # three 64-pair chunks: a one-chunk example would specialize the length
EXAMPLE_PAST_PAIRS = 7
WEIGHT = "w:"  # prefix of weight inputs
WEIGHT_T = "wT:"  # a weight input stored transposed (trace.pre_transpose_weights)
TRANSPOSED = ".T"  # suffix of the stored name of a transposed weight
# weight input prefix -> suffix of the stored tensor's name (the checkpoint name + suffix)
WEIGHT_INPUTS = {WEIGHT: "", WEIGHT_T: TRANSPOSED, "wq:": TRANSPOSED + ".q",
                 "wqs:": TRANSPOSED + ".scales", "wqz:": TRANSPOSED + ".zp"}


def weight_input(name: str) -> tuple[str, str] | None:
    """A piece input name -> (owner parameter, stored-name suffix), or None for activations."""
    for prefix, suffix in WEIGHT_INPUTS.items():
        if name.startswith(prefix):
            return name[len(prefix):], suffix
    return None
SAMPLING = tuple(n for n, _ in SAMPLING_INPUTS)
EMBED_PARAMS = ("model.model.embed_tokens.", "model.compressor.")
HEAD_PARAMS = ("model.model.norm.", "model.model.embed_tokens.", "model.lm_head.", "model.mtp.",
               "model.confidence_head.")
LM_HEAD_PARAMS = ("model.lm_head.weight", "model.model.embed_tokens.weight")  # the head piece's
# lm_head weight (tied: the embedding table)


@dataclass
class Piece:
    """fn(owner, *inputs) -> outputs, traced with `owner`'s parameters `params` as extra weight
    inputs. layer_prefix: the parameters are relative to model.layers.{i}."""

    name: str
    owner: nn.Module
    fn: Callable
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: Callable[[], tuple]
    params: tuple[str, ...]
    layer_prefix: bool = False

    def global_name(self, param: str, layer: int | None = None) -> str:
        """Checkpoint (PipoModel) name of a parameter of this piece's owner."""
        if self.layer_prefix:
            return f"model.layers.{layer}.{param[len('layer.'):]}"
        return param[len("model."):]


class LayerOwner(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def _params(owner: nn.Module, prefixes: tuple[str, ...] = ("",)) -> tuple[str, ...]:
    return tuple(n for n, _ in owner.named_parameters() if n.startswith(prefixes))


class PieceSet:
    """Every piece of one export, around a PipoStep (or RegularStep) whose parameters may be on
    the meta device: tracing reads only shapes and buffers."""

    def __init__(self, step: PipoStep, dtype: torch.dtype):
        self.step, self.dtype = step, dtype
        self.dt = str(dtype).replace("torch.", "")
        cfg = step.model.config.text
        self.h, self.vocab = cfg.hidden_size, cfg.vocab_size
        self.kv, self.hd = cfg.num_key_value_heads, cfg.head_dim
        self.rot = step.model.model.rotary_emb.inv_freq.shape[0] * 2
        self.slots = "prompt_pairs" if step.mtp else "prompt_tokens"
        self.gen = torch.Generator().manual_seed(0)

    # -- examples -------------------------------------------------------------------------
    def _rand(self, *shape, dtype=None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(dtype or self.dtype)

    def _prompt(self):
        """input_ids [B, T], lengths [B] (mixed, one odd), T spanning three delta-rule chunks."""
        b, t = EXAMPLE_BATCH, 2 * EXAMPLE_PROMPT_PAIRS
        ids = torch.randint(0, self.vocab, (b, t), generator=self.gen)
        return ids, torch.tensor([t - 1 - (t // 2 * i) // b for i in range(b)])

    def _embedded(self):
        """Example embed outputs of a prefill: x, valid, n_valid, cos, sin."""
        ids, lengths = self._prompt()
        n = ids.shape[1] // (2 if self.step.mtp else 1)
        n_valid = (lengths + 1) // 2 if self.step.mtp else lengths
        valid = torch.arange(n)[None] < n_valid[:, None]
        return ids, lengths, (self._rand(ids.shape[0], n, self.h), valid, n_valid,
                              self._rand(ids.shape[0], n, self.rot), self._rand(ids.shape[0], n, self.rot))

    def _past_mask(self, b: int, p: int) -> torch.Tensor:
        mask = torch.ones(b, p, dtype=torch.bool)
        mask[-1, p // 2:] = False
        return mask

    def _sampling(self, b: int) -> list[torch.Tensor]:
        feeds = sampling_feeds(SamplingParams(0.8, 5, 0.9, 0.0, 0.5, 1.1), 0.5, b)
        out = [torch.from_numpy(feeds[n]) for n, _ in SAMPLING_INPUTS]
        return out + [torch.rand(b, 2, generator=self.gen)]

    def state_spec(self, layer, kind: str, slots: str = "past_pairs") -> TensorSpec:
        """A layer state's spec: key/value [B, Hkv, slots, D], conv [B, C, K-1], recurrent
        [B, Hv, Dk, Dv] float32."""
        if kind in ("key", "value"):
            return TensorSpec(kind, self.dt, ("batch", self.kv, slots, self.hd))
        lin = layer.linear_attn
        if kind == "conv":
            return TensorSpec(kind, self.dt, ("batch", lin.conv_dim, lin.conv_kernel_size - 1))
        return TensorSpec(kind, "float32", ("batch", lin.num_v_heads, lin.head_k_dim,
                                            lin.head_v_dim))

    def _state_example(self, spec: TensorSpec, b: int, p: int) -> torch.Tensor:
        shape = [b if d == "batch" else p if d == "past_pairs" else d for d in spec.shape]
        return self._rand(*shape, dtype=getattr(torch, spec.dtype))

    # -- pieces ---------------------------------------------------------------------------
    def layer_pieces(self, layer) -> tuple[Piece, Piece]:
        """(prefill piece, decode piece) of `layer`'s type, traced from `layer`."""
        owner, kinds, k = LayerOwner(layer), LAYER_STATES[layer.block_type], self.step.kernels
        params, dt, slots, b = _params(owner), self.dt, self.slots, EXAMPLE_BATCH

        def prefill(o, x, valid, n_valid, past_mask, cos, sin, *past):
            x, st = layer_prefill(o.layer, x, valid, n_valid, past_mask, cos, sin,
                                  dict(zip(kinds, past)), k)
            return (x, *[st[s] for s in kinds])

        def prefill_example():
            x, valid, n_valid, cos, sin = self._embedded()[2]
            p = EXAMPLE_PAST_PAIRS
            return (x, valid, n_valid, self._past_mask(b, p), cos, sin,
                    *[self._state_example(self.state_spec(layer, s), b, p) for s in kinds])

        def decode(o, x, mask, cos, sin, *past):
            x, st = layer_decode(o.layer, x, mask, cos, sin, dict(zip(kinds, past)), k)
            return (x, *[st[s] for s in kinds])

        def decode_example():
            p = EXAMPLE_PAST_PAIRS
            return (self._rand(b, 1, self.h), self._past_mask(b, p + 1),
                    self._rand(b, 1, self.rot), self._rand(b, 1, self.rot),
                    *[self._state_example(self.state_spec(layer, s), b, p) for s in kinds])

        hidden = lambda n: TensorSpec("x", dt, ("batch", n, self.h))  # noqa: E731
        rope_in = lambda n: (TensorSpec("cos", dt, ("batch", n, self.rot)),  # noqa: E731
                             TensorSpec("sin", dt, ("batch", n, self.rot)))
        pre = Piece(f"prefill.{layer.block_type}", owner, prefill,
                    (hidden(slots), TensorSpec("valid", "bool", ("batch", slots)),
                     TensorSpec("n_valid", "int64", ("batch",)), self._past_mask_spec())
                    + rope_in(slots) + tuple(self.state_spec(layer, s).rename(PAST + s)
                                             for s in kinds),
                    (hidden(slots),) + tuple(self.state_spec(layer, s, f"past_pairs + {slots}")
                                             for s in kinds),
                    prefill_example, params, layer_prefix=True)
        dec = Piece(f"decode.{layer.block_type}", owner, decode,
                    (hidden(1), TensorSpec("mask", "bool", ("batch", "past_pairs + 1")))
                    + rope_in(1) + tuple(self.state_spec(layer, s).rename(PAST + s)
                                         for s in kinds),
                    (hidden(1),) + tuple(self.state_spec(layer, s, "past_pairs + 1")
                                         for s in kinds),
                    decode_example, params, layer_prefix=True)
        return pre, dec

    def _head_state_specs(self, slots: str) -> tuple[TensorSpec, ...]:
        kv = ("batch", self.kv, slots, self.hd)
        mtp = (TensorSpec(MTP_KEY, self.dt, kv), TensorSpec(MTP_VALUE, self.dt, kv)) \
            if self.step.mtp else ()
        return mtp + (TensorSpec(ATTENTION_MASK, "bool", ("batch", slots)),
                      TensorSpec(POSITION, "int64", ("batch",)),
                      TensorSpec(PROMPT_MASK, "bool", ("batch", self.vocab)),
                      TensorSpec(OUTPUT_MASK, "bool", ("batch", self.vocab)))

    def _extra_specs(self, mtp_slots) -> tuple[TensorSpec, ...]:
        """Head outputs the contract does not export (steps.HEAD_EXTRAS; validation, the
        quantization accuracy report and `eval` read them): token1's logits and, with an MTP,
        token2's logits and the tokens the MTP reads ([B, mtp_slots])."""
        logits = (TensorSpec(LOGITS, "float32", ("batch", self.vocab)),)
        if not self.step.mtp:
            return logits
        return logits + (TensorSpec(MTP_LOGITS, "float32", ("batch", self.vocab)),
                         TensorSpec(MTP_TOKENS, "int64", ("batch", mtp_slots)))

    def _past_mask_spec(self) -> TensorSpec:
        return TensorSpec(PAST + ATTENTION_MASK, "bool", ("batch", "past_pairs"))

    def _head_past(self) -> list[TensorSpec]:
        """The past states a head reads (every head state but position, which the embed and the
        head take first, beside the embed outputs)."""
        return [s.rename(PAST + s.name) for s in self._head_state_specs("past_pairs")
                if s.name != POSITION]

    def _past_example(self, specs: list[TensorSpec], b: int, p: int) -> list[torch.Tensor]:
        """Example past states of `specs` for b rows and p cached slots."""
        out = []
        for s in specs:
            if s.name == PAST + ATTENTION_MASK:
                out.append(self._past_mask(b, p))
            elif s.dtype == "bool":
                out.append(torch.rand(b, self.vocab, generator=self.gen) < 0.01)
            else:
                out.append(self._state_example(s, b, p))
        return out

    def _sampling_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, dt, ("batch",)) for n, dt in SAMPLING_INPUTS) + (
            TensorSpec(UNIFORMS, "float32", ("batch", 2)),)

    def prefill_pieces(self) -> tuple[Piece, Piece]:
        """(embed, head) of the prefill graph."""
        step, dt, slots, b = self.step, self.dt, self.slots, EXAMPLE_BATCH
        extras = self._extra_specs(slots)
        names = [s.name for s in self._head_state_specs(f"past_pairs + {slots}") + extras]
        embed_out = (TensorSpec("x", dt, ("batch", slots, self.h)),
                     TensorSpec("valid", "bool", ("batch", slots)),
                     TensorSpec("n_valid", "int64", ("batch",)),
                     TensorSpec("cos", dt, ("batch", slots, self.rot)),
                     TensorSpec("sin", dt, ("batch", slots, self.rot)))
        prompt = (TensorSpec(INPUT_IDS, "int64", ("batch", "prompt_tokens")),
                  TensorSpec(LENGTHS, "int64", ("batch",)))
        position = TensorSpec(PAST + POSITION, "int64", ("batch",))
        head_past = self._head_past()
        positions = torch.tensor([EXAMPLE_PAST_PAIRS, EXAMPLE_PAST_PAIRS // 2])

        def head(o, x, input_ids, lengths, valid, n_valid, position, cos, sin, *rest):
            past = {s.name[len(PAST):]: t for s, t in zip(head_past, rest)}
            rest = rest[len(head_past):]
            sp = dict(zip(SAMPLING, rest[1:-1]))
            pair, conf, st = o.prefill_head(x, input_ids, lengths, valid, n_valid, position, cos,
                                            sin, past, rest[0], sp, rest[-1])
            return (pair, conf, *[st[n] for n in names])

        def head_example():
            ids, lengths, (x, valid, n_valid, cos, sin) = self._embedded()
            return (x, ids, lengths, valid, n_valid, positions, cos, sin,
                    *self._past_example(head_past, b, EXAMPLE_PAST_PAIRS),
                    torch.tensor([-1, 7]), *self._sampling(ids.shape[0]))

        embed = Piece("prefill.embed", step,
                      lambda o, ids, lengths, position: o.prefill_embed(ids, lengths, position),
                      prompt + (position,), embed_out, lambda: (*self._prompt(), positions),
                      _params(step, EMBED_PARAMS))
        head_piece = Piece(
            "prefill.head", step, head,
            (embed_out[0],) + prompt + embed_out[1:3] + (position,) + embed_out[3:]
            + tuple(head_past) + (TensorSpec(NEXT_TOKEN, "int64", ("batch",)),)
            + self._sampling_specs(),
            (TensorSpec(PAIR, "int64", ("batch", 2)), TensorSpec(CONFIDENCE, "float32", ("batch",)))
            + self._head_state_specs(f"past_pairs + {slots}") + extras, head_example,
            _params(step, HEAD_PARAMS))
        return embed, head_piece

    def decode_pieces(self) -> tuple[Piece, Piece]:
        """(embed, head) of the decode graph."""
        step, dt, b, p = self.step, self.dt, EXAMPLE_BATCH, EXAMPLE_PAST_PAIRS
        past_specs = [s.rename(PAST + s.name) for s in self._head_state_specs("past_pairs")]
        past_in = {s.name: s for s in past_specs}
        head_past = [s for s in past_specs if s.name not in (PAST + ATTENTION_MASK,
                                                            PAST + POSITION)]
        extras = self._extra_specs(1)
        names = [s.name for s in self._head_state_specs("past_pairs + 1") + extras]
        rope_out = (TensorSpec("cos", dt, ("batch", 1, self.rot)),
                    TensorSpec("sin", dt, ("batch", 1, self.rot)))
        embed_out = (TensorSpec("x", dt, ("batch", 1, self.h)),
                     TensorSpec("mask", "bool", ("batch", "past_pairs + 1"))) + rope_out

        def embed_example():
            ids = torch.randint(0, self.vocab, (b, 2), generator=self.gen)
            return ids, self._past_mask(b, p), torch.tensor([p, p // 2])

        def head(o, x, mask, position, cos, sin, *rest):
            past = {s.name[len(PAST):]: t for s, t in zip(head_past, rest)}
            sampling = rest[len(head_past):]
            pair, conf, st = o.decode_head(x, mask, position, cos, sin, past,
                                           dict(zip(SAMPLING, sampling[:-1])), sampling[-1])
            return (pair, conf, *[st[n] for n in names])

        def head_example():
            _, mask, position = embed_example()
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool)], 1)
            past = self._past_example(head_past, b, p)
            return (self._rand(b, 1, self.h), mask, position, self._rand(b, 1, self.rot),
                    self._rand(b, 1, self.rot), *past, *self._sampling(b))

        embed = Piece("decode.embed", step,
                      lambda o, pair, mask, position: o.decode_embed(pair, mask, position),
                      (TensorSpec(INPUT_PAIR, "int64", ("batch", 2)),
                       past_in[PAST + ATTENTION_MASK], past_in[PAST + POSITION]),
                      embed_out, embed_example, _params(step, EMBED_PARAMS))
        head_piece = Piece(
            "decode.head", step, head,
            (embed_out[0], embed_out[1], past_in[PAST + POSITION]) + rope_out
            + tuple(head_past) + self._sampling_specs(),
            (TensorSpec(PAIR, "int64", ("batch", 2)), TensorSpec(CONFIDENCE, "float32", ("batch",)))
            + self._head_state_specs("past_pairs + 1") + extras, head_example,
            _params(step, HEAD_PARAMS))
        return embed, head_piece

    def layer_types(self) -> dict[str, nn.Module]:
        """One representative layer per layer type (first occurrence)."""
        out = {}
        for layer in self.step.layers:
            out.setdefault(layer.block_type, layer)
        return out


__all__ = ["Piece", "PieceSet", "FULL_ATTENTION", "WEIGHT"]
