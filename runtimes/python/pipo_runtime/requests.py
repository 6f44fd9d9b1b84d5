"""Host-side pieces of a request every backend shares: the model facts a request is checked
against, the checks, and the prefill feeds (the one numpy builder of the sampling inputs)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipo_graphs import step_uniforms
from pipo_graphs.contract import (INPUT_IDS, LENGTHS, NEXT_TOKEN, PAST, SAMPLING_INPUTS,
    UNIFORMS)
from pipo_graphs.dtypes import numpy_dtype
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import Manifest
from pipo_graphs.semantics import pack_prompts


@dataclass(frozen=True)
class ModelFacts:
    """What the generation loop needs to know about a model: from an export's manifest
    (`from_manifest`) or from a checkpoint's config (the torch backend)."""

    pad_id: int
    eos_ids: frozenset[int]
    vocab_size: int
    max_context: int  # tokens (prompt + generated) a request may use

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ModelFacts":
        m = manifest.model
        return cls(m.pad_token_id, frozenset(m.eos_token_ids), m.vocab_size, m.max_context)


def token_ids(prompt, what: str = "prompt") -> list[int]:
    """A prompt given as ids (a list/tuple of ints or a 1-D integer array) -> list[int];
    PipoUserError for anything else (floats, booleans, strings, None, nested lists)."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise PipoUserError(f"{what} must be a 1-D integer array of token ids, got "
                                f"{prompt.ndim}-D {prompt.dtype}")
        return [int(t) for t in prompt]
    if not isinstance(prompt, (list, tuple)):
        raise PipoUserError(f"{what} must be text or a list of token ids, got "
                            f"{type(prompt).__name__}")
    bad = [t for t in prompt if isinstance(t, (bool, np.bool_))
           or not isinstance(t, (int, np.integer))]
    if bad:
        raise PipoUserError(f"{what} holds {bad[0]!r} ({type(bad[0]).__name__}); token ids are "
                            "integers")
    return [int(t) for t in prompt]


def sampling_rows(rows) -> dict[str, np.ndarray]:
    """[(SamplingParams, threshold)] one per batch row -> the sampling graph inputs, each [B]
    (the one builder of them: runtimes, export validation, accuracy and tracing examples)."""
    values = [dict(vars(params), threshold=threshold) for params, threshold in rows]
    return {n: np.array([v[n] for v in values], dtype=dt) for n, dt in SAMPLING_INPUTS}


def sampling_feeds(params, threshold: float, batch: int) -> dict[str, np.ndarray]:
    """SamplingParams + threshold -> the sampling graph inputs, each [batch]."""
    return sampling_rows([(params, threshold)] * batch)


def prefill_feeds(prompts: list[list[int]], pad_id: int, sampling, threshold: float, seed: int,
                  seqs: list[int]) -> dict[str, np.ndarray]:
    """The prefill graph's inputs for a batch: input_ids [B, T even] (PAD-padded), lengths [B],
    sampling inputs [B] and step-0 uniforms [B, 2] of sequences `seqs`."""
    return row_prefill_feeds(prompts, pad_id, [(sampling, threshold)] * len(prompts),
                             [(seed, seq) for seq in seqs])


def row_uniforms(keys) -> np.ndarray:
    """[(seed, seq, step)] one per row -> uniforms [B, 2] float32: each row's own random stream
    (never its batch row)."""
    return np.concatenate([step_uniforms(seed, [seq], step) for seed, seq, step in keys]) \
        if keys else np.zeros((0, 2), np.float32)


def row_prefill_feeds(prompts: list[list[int]], pad_id: int, sampling, keys) -> dict:
    """The prefill inputs for rows that each bring their own settings: sampling
    [(SamplingParams, threshold)] and random keys [(seed, seq)], one per prompt
    -> input_ids [B, T even], lengths [B], sampling inputs [B], step-0 uniforms [B, 2]."""
    ids, lengths = pack_prompts(prompts, pad_id)
    return {INPUT_IDS: ids, LENGTHS: lengths, **sampling_rows(sampling),
            UNIFORMS: row_uniforms([(seed, seq, 0) for seed, seq in keys])}


def _dtype_name(dtype: str) -> str:
    """A contract dtype name, or an ONNX Runtime type string ("tensor(float)") -> the contract's."""
    if dtype.startswith("tensor("):
        dtype = dtype[len("tensor("):-1]
        return {"float": "float32", "double": "float64"}.get(dtype, dtype)
    return dtype


def empty_past(inputs, batch: int) -> dict[str, np.ndarray]:
    """The prefill inputs of fresh sequences besides the prompt and sampling (contract 1.1):
    every past.<state> empty (0 cached slots, zero conv windows and recurrent states, position
    0, empty penalty masks) and next_token -1 [B]. inputs: the prefill graph's inputs, objects
    with name, dtype (contract name or ORT type string) and shape (manifest TensorInfo, export
    TensorSpec, ORT NodeArg under `ort_inputs`); {} for a contract 1.0 graph."""
    out = {}
    for t in inputs:
        if t.name == NEXT_TOKEN:
            out[t.name] = np.full(batch, -1, np.int64)
        elif t.name.startswith(PAST):
            shape = [batch if d == "batch" else d if isinstance(d, int) else 0 for d in t.shape]
            out[t.name] = np.zeros(shape, numpy_dtype(_dtype_name(t.dtype)))
    return out


@dataclass(frozen=True)
class GraphInput:
    """One graph input as empty_past reads it."""

    name: str
    dtype: str
    shape: tuple


def ort_inputs(session) -> list[GraphInput]:
    """An onnxruntime InferenceSession's inputs as GraphInputs."""
    return [GraphInput(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]


def check_request(facts: ModelFacts, prompts: list[list[int]], max_steps: int,
                  stop_ids=()) -> None:
    """Ids (prompt and stop ids) inside the vocabulary, prompt plus steps within max_context
    (PipoUserError)."""
    bad = [t for t in stop_ids if not 0 <= t < facts.vocab_size]
    if bad:
        raise PipoUserError(f"stop token ids {bad[:5]} are outside the vocabulary "
                            f"[0, {facts.vocab_size})")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < facts.vocab_size]
        if bad:
            raise PipoUserError(f"token ids {bad[:5]} are outside the vocabulary "
                                f"[0, {facts.vocab_size})")
        need = len(p) + len(p) % 2 + 2 * max_steps
        if need > facts.max_context:
            raise PipoUserError(f"prompt of {len(p)} tokens plus {max_steps} steps needs {need} "
                                f"tokens of context; this export allows {facts.max_context}")
