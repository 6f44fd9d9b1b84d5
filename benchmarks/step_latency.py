"""Per-step latency of an export on ONNX Runtime (CPU) against the torch reference decoder.

    python benchmarks/step_latency.py CKPT OUT [--prompt-tokens 64] [--steps 32] [--repeats 3]

Times prefill and every decode step separately (median over repeats, after one warm-up run),
same prompt, greedy, tau = 0.5, on three paths:
  ort-minimal   plain session.run: numpy feeds and outputs every step (sessions from
                pipo_runtime's shared_sessions)
  pipo_runtime  the onnxruntime backend's OrtStepRunner: IO binding, states stay OrtValues
  torch         the torch backend's TorchStepRunner (pipo_export's step functions, float32)
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
from pipo_export.model.torch_backend import TorchStepRunner
from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.contract import DECODE, INPUT_PAIR, PAIR, PREFILL, UNIFORMS, present_to_past
from pipo_graphs.manifest import load_manifest
from pipo_runtime.backends.base import RunnerOptions
from pipo_runtime.backends.onnxruntime import OrtStepRunner, shared_sessions
from pipo_runtime.requests import empty_past, ort_inputs, prefill_feeds, sampling_feeds


def _paths(folder: Path):
    m = load_manifest(folder)
    return m, folder / m.graphs[PREFILL].file, folder / m.graphs[DECODE].file


def time_ort(folder: Path, prompt, steps: int, threshold: float, threads: int):
    m, pre_path, dec_path = _paths(folder)
    pre, dec = shared_sessions([pre_path, dec_path], RunnerOptions(threads=threads))
    fixed = sampling_feeds(SamplingParams(), threshold, 1)
    feeds = prefill_feeds([prompt], m.model.pad_token_id, SamplingParams(), threshold, 0, [0])
    feeds.update(empty_past(ort_inputs(pre), 1))  # a fresh sequence (contract 1.1)
    t = time.perf_counter()
    out = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, feeds)))
    prefill = time.perf_counter() - t
    names = [o.name for o in dec.get_outputs()]
    per_step = []
    for s in range(1, steps):
        feeds = {INPUT_PAIR: out[PAIR], **fixed, UNIFORMS: step_uniforms(0, [0], s),
                 **present_to_past(out)}
        t = time.perf_counter()
        out = dict(zip(names, dec.run(None, feeds)))
        per_step.append(time.perf_counter() - t)
    return prefill, per_step


def time_runner(runner, pad_id: int, prompt, steps: int, threshold: float):
    """prefill + decode steps of any StepRunner -> (prefill s, [step s], token2s kept)."""
    feeds = prefill_feeds([prompt], pad_id, SamplingParams(), threshold, 0, [0])
    t = time.perf_counter()
    runner.prefill(feeds)
    prefill = time.perf_counter() - t
    per_step, kept = [], 0
    for s in range(1, steps):
        u = step_uniforms(0, [0], s)
        t = time.perf_counter()
        pair, _ = runner.decode(u)
        per_step.append(time.perf_counter() - t)
        kept += int(pair[0, 1] != pad_id)
    return prefill, per_step, kept


def time_session(folder: Path, prompt, steps: int, threshold: float, threads: int):
    m, pre_path, dec_path = _paths(folder)
    runner = OrtStepRunner(pre_path, dec_path, RunnerOptions(threads=threads))
    return time_runner(runner, m.model.pad_token_id, prompt, steps, threshold)


def time_torch(model, prompt, steps: int, threshold: float):
    runner = TorchStepRunner(PipoStep(model))
    return time_runner(runner, model.config.pad_token_id, prompt, steps, threshold)[:2]


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
    paths = {"ort-minimal": lambda: time_ort(Path(a.export), prompt, a.steps, a.threshold,
                                             a.threads),
             "pipo_runtime": lambda: time_session(Path(a.export), prompt, a.steps, a.threshold,
                                                  a.threads),
             "torch": lambda: time_torch(model, prompt, a.steps, a.threshold)}
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
