"""One timed ONNX Runtime GenAI run; executed by the peer venv's python as a script
(`python ortgenai_child.py SPEC.json`), so it imports only the standard library at the top and
onnxruntime_genai inside `measure`. Prints one JSON object.

SPEC: {"model": folder, "prompt": [ids], "new_tokens": N, "threads": T, "warmup": W,
"spin": bool}.

Per run: a fresh og.Generator (untimed) with max_length = min_length = prompt + N, greedy
(min_length masks EOS, so exactly N tokens; max_length sizes the shared KV buffer to what is
needed, as llama-bench's n_ctx does), then
  ttft_ms      = append_tokens(prompt) [the prefill forward; with prune_lm_head only the last
                 position's logits] + the first generate_next_token() [a greedy pick from those
                 logits, no forward];
  ms_per_token = mean of the other N - 1 generate_next_token() calls (one 1-token decode forward
                 at depth >= prompt + a greedy pick + the Python call).
Model load and generator creation are not timed; W warm-up runs come first. cpu_others: cores
other processes used during the timed run (/proc/stat minus this process's CPU time).
"""
from __future__ import annotations

import json
import os
import sys
import time


def overlay(threads: int, spin: bool = True) -> dict:
    """The genai_config overlay: CPU session options of the decoder. Numbers must be JSON
    numbers; unknown keys with string values pass through as ORT session config entries."""
    options: dict = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    if not spin:
        options["session.intra_op.allow_spinning"] = "0"
        options["session.inter_op.allow_spinning"] = "0"
    return {"model": {"decoder": {"session_options": options}}}


def _busy_seconds() -> float:
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def measure(spec: dict) -> dict:
    import onnxruntime_genai as og

    prompt, n = [int(i) for i in spec["prompt"]], int(spec["new_tokens"])
    config = og.Config(spec["model"])
    config.clear_providers()  # CPU
    layer = overlay(int(spec["threads"]), bool(spec.get("spin", True)))
    config.overlay(json.dumps(layer))
    t0 = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    def one_run() -> tuple[float, list[float], int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n,
                                  do_sample=False, batch_size=1)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(prompt)  # prefill forward
        gen.generate_next_token()  # token 1: greedy pick from the prefill's logits
        first = time.perf_counter() - start
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()  # one decode forward + pick
            steps.append(time.perf_counter() - t)
        made = len(gen.get_sequence(0)) - len(prompt)
        del gen
        return first, steps, made

    for _ in range(int(spec.get("warmup", 1))):
        one_run()
    b0, m0, w0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    first, steps, made = one_run()
    b1, m1, w1 = _busy_seconds(), _own_seconds(), time.perf_counter()
    if made != n or len(steps) != n - 1:
        raise RuntimeError(f"expected {n} new tokens, got {made}")
    return {"ttft_ms": first * 1e3, "ms_per_token": sum(steps) * 1e3 / len(steps),
            "generated": made, "load_s": load_s,
            "cpu_others": max(0.0, (b1 - b0 - (m1 - m0)) / (w1 - w0)),
            "session_options": layer["model"]["decoder"]["session_options"],
            "versions": {"onnxruntime_genai": og.__version__}}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(measure(json.load(f))))
