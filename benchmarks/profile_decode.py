"""Where a decode step's time goes: ONNX Runtime's profiler on an export's decode graph.

    python benchmarks/profile_decode.py EXPORT [--context 1024] [--steps 16] [--threads 2]
        [--batch 1] [--no-profiler] [--json F]

Prefills --batch random prompts of --context tokens, runs --steps decode steps (greedy, tau < 0) with
SessionOptions.enable_profiling, and prints kernel time per op type and the slowest nodes, per
step. The profiler slows a step down (~45 % on the 0.8B int4 export), so read the shares.
--no-profiler: only the median wall time of a step, the profiler off (for A/B timing).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.contract import DECODE, PREFILL
from pipo_graphs.manifest import load_manifest
from pipo_runtime.backends.base import RunnerOptions
from pipo_runtime.backends.onnxruntime import OrtStepRunner
from pipo_runtime.requests import prefill_feeds


def profile(folder: str, context: int, steps: int, threads: int, prefix: str | None,
            batch: int = 1) -> dict:
    """-> {"ms_per_step", "kernel_ms_per_step", "by_op": {op: ms/step}, "by_node": {...}};
    prefix None: the profiler off, the runtime's own session options, -> {"ms_per_step"}
    (the median step)."""
    m = load_manifest(folder)
    options = RunnerOptions(threads=threads)
    if prefix:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        so.enable_profiling, so.profile_file_prefix = True, prefix
        options = RunnerOptions(session_options=so)
    runner = OrtStepRunner(f"{folder}/{m.graphs[PREFILL].file}", f"{folder}/{m.graphs[DECODE].file}",
                           options)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, m.model.vocab_size - 1, context).tolist() for _ in range(batch)]
    rows = list(range(batch))
    runner.prefill(prefill_feeds(prompts, m.model.pad_token_id, SamplingParams(), -1.0, 0, rows))
    times = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        runner.decode(step_uniforms(0, rows, step))
        times.append(time.perf_counter() - start)
    if not prefix:
        return {"ms_per_step": 1e3 * statistics.median(times)}
    ms_per_step = 1e3 * sum(times) / steps
    path = runner.dec.end_profiling()
    runner.pre.end_profiling()
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in json.load(open(path)):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
            by_node[e["name"][:-len("_kernel_time")]] += e["dur"] / 1e3 / steps
    return {"ms_per_step": ms_per_step, "kernel_ms_per_step": sum(by_op.values()),
            "by_op": dict(by_op.most_common()), "by_node": dict(by_node.most_common(12))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--json", default=None, metavar="F", help="also write the result here")
    p.add_argument("--prefix", default="/tmp/pipo_profile")
    p.add_argument("--no-profiler", action="store_true",
                   help="time the steps with the profiler off (median ms per step)")
    a = p.parse_args()
    r = profile(a.export, a.context, a.steps, a.threads, None if a.no_profiler else a.prefix,
                a.batch)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"export": a.export, "batch": a.batch, "context": a.context, **r}, f, indent=1)
    if a.no_profiler:
        print(f"{a.export}: {r['ms_per_step']:.2f} ms/step (median of {a.steps}, profiler off)")
        return
    total = r["kernel_ms_per_step"]
    print(f"{a.export}: {r['ms_per_step']:.2f} ms/step with the profiler on, kernels {total:.2f}")
    for op, ms in list(r["by_op"].items())[:10]:
        print(f"  {op:28s} {100 * ms / total:5.1f} %  {ms:7.2f} ms/step")
    for node, ms in r["by_node"].items():
        print(f"    {node[:72]:72s} {ms:7.2f} ms/step")


if __name__ == "__main__":
    main()
