"""A minimal generation loop over an export: prefill once, then decode step by step, feeding
each step's present.* states back as past.*. (The full runtime adds IO binding and streaming.)"""
from __future__ import annotations

import numpy as np

from pipo_graphs import step_uniforms
from pipo_graphs.contract import PAST, PRESENT, SAMPLING_INPUTS, UNIFORMS
from pipo_graphs.errors import PipoUserError
from pipo_graphs.semantics import SequenceOutput, pack_prompts

from .runners import GraphRunner


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
                  eos_ids=(), stop_ids=(), seq_offset: int = 0) -> list[SequenceOutput]:
    """Greedy or sampled generation with two active runners; one SequenceOutput per prompt."""
    pad = manifest["model"]["pad_token_id"]
    check_request(manifest, prompts, max_steps)
    sampling.validate()
    seqs = [seq_offset + i for i in range(len(prompts))]
    feeds = prefill_feeds(prompts, pad, sampling, threshold, seed, seqs)
    fixed = {n: feeds[n] for n, _ in SAMPLING_INPUTS}
    outs = [SequenceOutput() for _ in prompts]
    eos, stop = set(eos_ids), set(stop_ids)
    result = prefill.infer(feeds)
    for step in range(max_steps):
        if step:
            past = {PAST + k[len(PRESENT):]: v for k, v in result.items() if k.startswith(PRESENT)}
            result = decode.infer({"input_pair": result["pair"], **past, **fixed,
                                   UNIFORMS: step_uniforms(seed, seqs, step)})
        for row, out in enumerate(outs):
            if not out.done:
                out.add_pair(result["pair"][row], result["confidence"][row], pad, eos, stop)
        if all(o.done for o in outs):
            break
    for out in outs:
        out.finish_reason = out.finish_reason or "length"
    return outs
