"""Per-step latency of an export on ONNX Runtime (CPU) against the torch reference decoder.

    python benchmarks/step_latency.py CKPT OUT [--prompt-tokens 64] [--steps 32] [--repeats 3]

Times prefill and every decode step separately (median over repeats, after one warm-up run),
same prompt, greedy, tau = 0.5, on three paths:
  ort-minimal   pipo_runtime.requests's loop: numpy feeds and outputs every step (session.run)
  pipo_runtime  PipoSession's ONNX Runtime engine: IO binding, states stay OrtValues
  torch         pipo_export's reference step functions (eager, float32)
ms/token divides decode time by the user tokens those steps produced (1 or 2 per step).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipo_export import load_checkpoint
from pipo_export.model.steps import PipoStep
from pipo_export.model.sampling import sampling_tensors
from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.contract import present_to_past
from pipo_graphs.manifest import load_manifest
from pipo_graphs.semantics import pack_prompts
from pipo_runtime.backends.base import OrtBindingEngine
from pipo_runtime.requests import sampling_feeds
from pipo_runtime.runners import OrtRunner


def time_ort(folder: Path, ids, lengths, steps: int, threshold: float, threads: int):
    m = load_manifest(folder)
    fixed = sampling_feeds(SamplingParams(), threshold, 1)
    with OrtRunner(folder / m["graphs"]["prefill_compress"]["file"], threads=threads) as pre, \
            OrtRunner(folder / m["graphs"]["decode_unfold"]["file"], threads=threads) as dec:
        t = time.perf_counter()
        out = pre.infer({"input_ids": ids, "lengths": lengths, **fixed,
                         "uniforms": step_uniforms(0, [0], 0)})
        prefill = time.perf_counter() - t
        per_step = []
        for s in range(1, steps):
            feeds = {"input_pair": out["pair"], **fixed, "uniforms": step_uniforms(0, [0], s),
                     **present_to_past(out)}
            t = time.perf_counter()
            out = dec.infer(feeds)
            per_step.append(time.perf_counter() - t)
    return prefill, per_step


def time_session(folder: Path, ids, lengths, steps: int, threshold: float, threads: int):
    m = load_manifest(folder)
    fixed = sampling_feeds(SamplingParams(), threshold, 1)
    engine = OrtBindingEngine(folder / m["graphs"]["prefill_compress"]["file"],
                              folder / m["graphs"]["decode_unfold"]["file"],
                              ["CPUExecutionProvider"], threads=threads)
    t = time.perf_counter()
    engine.prefill({"input_ids": ids, "lengths": lengths, **fixed,
                    "uniforms": step_uniforms(0, [0], 0)})
    prefill = time.perf_counter() - t
    per_step, kept = [], 0
    for s in range(1, steps):
        u = step_uniforms(0, [0], s)
        t = time.perf_counter()
        pair, _ = engine.decode(u)
        per_step.append(time.perf_counter() - t)
        kept += int(pair[0, 1] != m["model"]["pad_token_id"])
    return prefill, per_step, kept


@torch.no_grad()
def time_torch(model, ids, lengths, steps: int, threshold: float):
    step = PipoStep(model)
    sp = sampling_tensors(SamplingParams(), 1, threshold)
    t = time.perf_counter()
    pair, _, st = step.prefill(torch.from_numpy(ids), torch.from_numpy(lengths), sp,
                               torch.from_numpy(step_uniforms(0, [0], 0)))
    prefill = time.perf_counter() - t
    per_step = []
    for s in range(1, steps):
        t = time.perf_counter()
        pair, _, st = step.decode(pair, st, sp, torch.from_numpy(step_uniforms(0, [0], s)))
        per_step.append(time.perf_counter() - t)
    return prefill, per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("export")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = default)")
    a = ap.parse_args()
    model = load_checkpoint(a.checkpoint)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size - 2, a.prompt_tokens).tolist()
    ids, lengths = pack_prompts([prompt], model.config.pad_token_id)
    paths = {"ort-minimal": lambda: time_ort(Path(a.export), ids, lengths, a.steps, a.threshold,
                                             a.threads),
             "pipo_runtime": lambda: time_session(Path(a.export), ids, lengths, a.steps,
                                                  a.threshold, a.threads),
             "torch": lambda: time_torch(model, ids, lengths, a.steps, a.threshold)}
    results = {name: [] for name in paths}
    for r in range(a.repeats + 1):  # first round is warm-up
        for name, fn in paths.items():
            out = fn()
            if r:
                results[name].append(out)
    kept = results["pipo_runtime"][0][2]  # greedy: every path makes the same tokens
    tokens = (a.steps - 1) + kept
    print(f"prompt {a.prompt_tokens} tokens, {a.steps - 1} decode steps -> {tokens} tokens "
          f"(token2 kept {kept}/{a.steps - 1}), batch 1, tau {a.threshold}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'path':13s} {'prefill ms':>11s} {'ms/step (median)':>17s} {'p10-p90':>14s} "
          f"{'ms/token':>9s}")
    for name, runs in results.items():
        pre = statistics.median(r[0] for r in runs) * 1e3
        steps = [s * 1e3 for r in runs for s in r[1]]
        q = np.percentile(steps, [10, 50, 90])
        per_token = statistics.median(sum(r[1]) for r in runs) * 1e3 / tokens
        print(f"{name:13s} {pre:11.2f} {q[1]:17.3f} {q[0]:7.3f}-{q[2]:.3f} {per_token:9.3f}")


if __name__ == "__main__":
    main()
