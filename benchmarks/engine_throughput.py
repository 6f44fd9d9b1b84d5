"""Continuous batching on the onnxruntime backend: decode ms/step by batch size, the engine's
aggregate tokens/s by concurrency, the cost of a join, and what one non-greedy row costs a batch.

    python benchmarks/engine_throughput.py EXPORT [--threads 2] [--context 1024]
        [--batches 1,2,4,8,16] [--concurrency 1,4,8,16] [--new-tokens 128] [--steps 16]
        [--repeats 3] [--parts decode,engine,join,branches] [--json out.json]

Timings are the best of `repeats` interleaved rounds (each round: the median over its steps),
so a shared machine's contention inflates them less.

decode      B rows with `context`-token prompts (greedy, tau 0.5), median ms per decode step
engine      N requests submitted at once to Engine(max_batch=max(N)), `new-tokens` user tokens
            each (EOS ignored: the session's EOS ids are cleared); aggregate user tokens/s from
            the first submit to the last result, and its ratio to N = 1
join        ms of one merge of a newcomer (one row, `context` tokens) into B - 1 running rows,
            and the padding ratio of the merged cache
branches    batch-wide `If`s of the decode graph: ms/step of B = 8 rows all greedy with tau >= 1
            (argmax-only and MTP-skip branches taken) vs the same batch with one sampled row
            (the full sampler runs for all rows) and with one tau = 0.5 row (MTP and confidence
            head run for all rows)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

from pipo_graphs import SamplingParams
from pipo_runtime import GenerationConfig, PipoSession
from pipo_runtime.engine import Engine, EngineConfig
from pipo_runtime.requests import row_prefill_feeds, row_uniforms

GREEDY, SAMPLED = SamplingParams(), SamplingParams(temperature=1.0, top_k=20, top_p=0.95)


def _prompts(session, rows: int, tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = session.facts.vocab_size - 2
    return [[rng.randrange(vocab) for _ in range(tokens)] for _ in range(rows)]


def decode_ms(session, prompts, settings, steps: int) -> float:
    """Median ms of a decode step: rows = prompts with settings [(SamplingParams, tau)]."""
    runner = session.runner.begin()
    runner.prefill(row_prefill_feeds(prompts, session.facts.pad_id, settings,
                                     [(0, i) for i in range(len(prompts))]))
    times = []
    for step in range(1, steps + 1):
        uniforms = row_uniforms([(0, i, step) for i in range(len(prompts))])
        t = time.perf_counter()
        runner.decode(uniforms)
        times.append(time.perf_counter() - t)
    runner.end()
    return 1e3 * statistics.median(times)


def engine_tps(session, n: int, context: int, new_tokens: int) -> dict:
    engine = Engine(session, EngineConfig(max_batch=n, max_prefill_tokens=max(2048, context)))
    config = GenerationConfig(max_new_tokens=new_tokens, threshold=0.5)
    start = time.perf_counter()
    handles = [engine.submit(p, config, seq=i) for i, p in enumerate(_prompts(session, n,
                                                                                context, 1))]
    results = [h.result() for h in handles]
    seconds = time.perf_counter() - start
    stats = engine.stats()
    engine.shutdown()
    tokens = sum(len(r.tokens) for r in results)
    return {"requests": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "steps": stats.steps}


def best_of(repeats: int, runs: dict) -> dict:
    """{name: callable -> ms}: the minimum per name over `repeats` rounds, names interleaved."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def join_ms(session, rows: int, context: int) -> dict:
    settings = [(GREEDY, 0.5)] * rows
    prompts = _prompts(session, rows, context, 2)
    batch = session.runner.begin()
    batch.merge(_prefilled(session, prompts[:-1], settings[:-1]))
    for step in range(1, 9):  # the running rows are 8 steps ahead of the newcomer
        batch.decode(row_uniforms([(0, i, step) for i in range(rows - 1)]))
    new = _prefilled(session, prompts[-1:], settings[-1:])
    t = time.perf_counter()
    batch.merge(new)
    ms = 1e3 * (time.perf_counter() - t)
    mask = batch.attention_mask()
    batch.end()
    return {"rows": rows, "merge_ms": ms, "padding_ratio": 1 - mask.mean()}


def _prefilled(session, prompts, settings):
    runner = session.runner.begin()
    runner.prefill(row_prefill_feeds(prompts, session.facts.pad_id, settings,
                                     [(0, i) for i in range(len(prompts))]))
    return runner


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--parts", default="decode,engine,join,branches",
                    help="which measurements to run (comma-separated)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    session = PipoSession.load(args.export, threads=args.threads)
    session.facts = replace(session.facts, eos_ids=frozenset())  # EOS ignored
    out = {"export": args.export, "threads": args.threads, "context": args.context}
    batches = [int(b) for b in args.batches.split(",")]
    parts = set(args.parts.split(","))
    if "decode" in parts:
        out["decode"] = _decode_table(session, batches, args)
    if "engine" in parts:
        out["engine"] = _engine_table(session, args)
    if "join" in parts:
        out["join"] = _join_table(session, batches, args)
    if "branches" in parts:
        out["branches"] = _branch_table(session, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    session.close()


def _decode_table(session, batches, args) -> list[dict]:
    prompts = {b: _prompts(session, b, args.context) for b in batches}
    decode = best_of(args.repeats, {b: lambda b=b: decode_ms(
        session, prompts[b], [(GREEDY, 0.5)] * b, args.steps) for b in batches})
    table = [{"rows": b, "ms_per_step": ms} for b, ms in decode.items()]
    for row in table:
        print(f"decode B={row['rows']:3d}: {row['ms_per_step']:8.2f} ms/step", flush=True)
    return table


def _engine_table(session, args) -> list[dict]:
    table = [engine_tps(session, int(n), args.context, args.new_tokens)
             for n in args.concurrency.split(",")]
    for row in table:
        row["speedup"] = row["tokens_per_s"] / table[0]["tokens_per_s"]
        print(f"engine N={row['requests']:3d}: {row['tokens_per_s']:8.1f} tokens/s "
              f"({row['speedup']:.2f}x N={table[0]['requests']})", flush=True)
    return table


def _join_table(session, batches, args) -> list[dict]:
    table = []
    for b in (b for b in batches if b > 1):
        joins = [join_ms(session, b, args.context) for _ in range(args.repeats)]
        table.append(min(joins, key=lambda j: j["merge_ms"]))
    for row in table:
        print(f"join into B={row['rows']:3d}: {row['merge_ms']:8.2f} ms, padding "
              f"{row['padding_ratio']:.3f}", flush=True)
    return table


def _branch_table(session, args) -> dict:
    eight = _prompts(session, 8, args.context, 3)
    mixes = {"all greedy, tau 1": [(GREEDY, 1.0)] * 8,
             "one sampled row": [(SAMPLED, 1.0)] + [(GREEDY, 1.0)] * 7,
             "one tau 0.5 row": [(GREEDY, 0.5)] + [(GREEDY, 1.0)] * 7,
             "all sampled, tau 0.5": [(SAMPLED, 0.5)] * 8}
    table = best_of(args.repeats, {name: lambda rows=rows: decode_ms(
        session, eight, rows, args.steps) for name, rows in mixes.items()})
    for name, ms in table.items():
        print(f"B=8 {name:22s}: {ms:8.2f} ms/step", flush=True)
    return table


if __name__ == "__main__":
    main()
