"""Host-side pieces every runtime loop shares: request checks, the prefill feeds, and
`generate_with`, generation over any two GraphRunners (numpy feeds, no IO binding)."""
from __future__ import annotations

import numpy as np

from pipo_graphs import step_uniforms
from pipo_graphs.contract import SAMPLING_INPUTS, UNIFORMS
from pipo_graphs.errors import PipoUserError
from pipo_graphs.semantics import SequenceOutput, pack_prompts

from pipo_runtime.runners import GraphRunner


def sampling_feeds(params, threshold: float, batch: int) -> dict[str, np.ndarray]:
    values = dict(vars(params), threshold=threshold)
    return {n: np.full((batch,), values[n], dtype=dt) for n, dt in SAMPLING_INPUTS}


def prefill_feeds(prompts: list[list[int]], pad_id: int, sampling, threshold: float, seed: int,
                  seqs: list[int]) -> dict[str, np.ndarray]:
    """The prefill graph's inputs for a batch: input_ids [B, T even] (PAD-padded), lengths [B],
    sampling inputs [B] and step-0 uniforms [B, 2] of sequences `seqs`."""
    ids, lengths = pack_prompts(prompts, pad_id)
    return {"input_ids": ids, "lengths": lengths, **sampling_feeds(sampling, threshold, len(ids)),
            UNIFORMS: step_uniforms(seed, seqs, 0)}


def check_request(manifest: dict, prompts: list[list[int]], max_steps: int) -> None:
    vocab, max_context = manifest["model"]["vocab_size"], manifest["model"]["max_context"]
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise PipoUserError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        need = len(p) + len(p) % 2 + 2 * max_steps
        if need > max_context:
            raise PipoUserError(f"prompt of {len(p)} tokens plus {max_steps} steps needs {need} "
                                f"tokens of context; this export allows {max_context}")


def generate_with(prefill: GraphRunner, decode: GraphRunner, manifest: dict,
                  prompts: list[list[int]], max_steps: int, threshold: float, sampling, seed: int,
                  stop_ids=(), seq_offset: int = 0) -> list[SequenceOutput]:
    """Greedy or sampled generation over two runners (numpy feeds, no IO binding): PipoSession's
    loop on a RunnerEngine. One SequenceOutput per prompt."""
    from pipo_runtime.backends.base import RunnerEngine
    from pipo_runtime.session import GenerationConfig, PipoSession

    session = PipoSession(None, manifest, RunnerEngine(prefill, decode), tokenizer=None)
    config = GenerationConfig(max_steps=max_steps, threshold=threshold, sampling=sampling,
                              seed=seed, seq_offset=seq_offset, stop_token_ids=tuple(stop_ids))
    return session.generate(prompts, config).sequences
