"""`python -m benchmarks.peers`: prepare every method, run them interleaved, report.

1. the checkpoint: the shape's real text dims (optionally cut with --layers), random weights,
   released layout (bench.run.write_checkpoint);
2. our exports: PIPO and regular per --precisions (ours.prepare);
3. the plain Qwen3.5 folder of the same weights (hf_folder), each peer's venv (venvs), its
   conversions (ortgenai.convert per --genai-precisions, llamacpp.convert per --gguf-types);
   a peer or a precision that fails here is skipped with one line;
4. per context, --repeats rounds; a round measures every method once, in an order rotated by
   one each round. A measurement loads the model, runs one warm-up and one timed generation
   (llama-bench: its own warm-up, -r 1), waiting first (up to --wait-idle s) for other processes
   to leave the cores idle; one that other processes disturbed (>= 0.25 cores) is re-timed up to
   --retries times, the cleanest kept, and flagged if still disturbed;
5. medians with min and max, the bytes-moved bound of PIPO over regular per precision, a
   markdown table, JSON and a plot (report).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipo_graphs.errors import PipoUserError

from benchmarks.peers import Sample
from benchmarks.peers.machine import machine_info
from benchmarks.peers.venvs import log

PEERS = ("ortgenai", "llamacpp")


@dataclass
class PeerBenchOptions:
    """Every knob of `python -m benchmarks.peers` (the CLI fills it)."""

    shape: str = "qwen3.5-0.8b"
    layers: int | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 4096])
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 2  # every tool
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8", "int4"])
    block_size: int = 32
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    genai_precisions: list[str] = field(default_factory=lambda: ["int4", "fp32"])
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "Q4_K_M"])
    peer_root: str = "build/peers"
    install: bool = True
    jobs: int = 2
    wait_idle: float = 60.0
    retries: int = 1
    workdir: str = "build/bench"
    json_file: str | None = None
    plot_file: str | None = None
    rebuild: bool = False
    seed: int = 0
    gated_commit_rate: float | None = None  # the trained gate's commit rate (quality table)


@dataclass
class Method:
    """One timed thing: a tool at a precision, and how to measure it once."""

    key: str
    tool: str
    precision: str
    artifact: str
    bytes: int
    run: Callable[[list[int], int], Sample]  # (prompt ids, new tokens) -> Sample
    peer: bool = False
    info: dict = field(default_factory=dict)


def check(opts: PeerBenchOptions) -> None:
    """Refuse bad options before any work."""
    from benchmarks.peers.ours import PRECISIONS
    from pipo_export.model.shapes import SHAPES
    if opts.shape not in SHAPES:
        raise PipoUserError(f"--peers needs a released-layout shape ({', '.join(SHAPES)}), got "
                            f"{opts.shape!r}: the peers convert a Qwen3.5 folder with its vision "
                            "tower")
    if min(opts.contexts) < 1 or opts.new_tokens < 2 or opts.repeats < 1 or opts.threads < 1:
        raise PipoUserError("--contexts must be >= 1, --new-tokens >= 2, --repeats >= 1, "
                            "--threads >= 1")
    bad = [p for p in opts.precisions if p not in PRECISIONS]
    if bad or not opts.precisions:
        raise PipoUserError(f"--precisions takes {', '.join(PRECISIONS)}; got {bad or 'none'}")
    unknown = [p for p in opts.peers if p not in PEERS]
    if unknown:
        raise PipoUserError(f"--peers takes {', '.join(PEERS)}; got {', '.join(unknown)}")


def our_methods(exports, threads: int) -> list[Method]:
    from benchmarks.peers import ours
    return [Method(e.key, ours.TOOLS[e.mode], e.precision, str(e.folder), e.bytes,
                   lambda prompt, n, e=e: ours.measure(e, prompt, n, threads),
                   info={"export_s": e.export_s})
            for e in exports]


def peer_methods(name: str, hf: Path, root: Path, opts: PeerBenchOptions,
                 skipped: list[dict]) -> tuple[list[Method], dict]:
    """Set up one peer and convert its precisions; -> (methods, environment info). Any
    failure skips the peer (or one precision) with one line."""
    from benchmarks.peers import llamacpp, ortgenai
    from benchmarks.peers.venvs import ENSURE, SetupOptions
    label = {"ortgenai": "onnxruntime-genai", "llamacpp": "llama.cpp"}[name]
    try:
        env = ENSURE[name](SetupOptions(Path(opts.peer_root), install=opts.install,
                                        jobs=opts.jobs))
    except Exception as exc:  # never fail the bench for a peer
        log(f"skipping {label}: {exc}")
        skipped.append({"what": label, "reason": str(exc)})
        return [], {}
    info = {"python": str(env.python), "versions": env.versions,
            "setup_s": round(env.setup_s, 1)}
    log(f"{label} ready ({env.python}; checked in {env.setup_s:.0f} s)")
    scratch = root / "runs"
    methods = []
    for precision in (opts.genai_precisions if name == "ortgenai" else opts.gguf_types):
        try:
            if name == "ortgenai":
                model = ortgenai.convert(env, hf, root / f"genai-{precision}", precision,
                                         opts.rebuild)
                run = (lambda prompt, n, m=model: ortgenai.measure(env, m, prompt, n,
                                                                   opts.threads, scratch))
                path, size, seconds = model.folder, model.bytes, model.convert_s
                extra = {}
            else:
                model = llamacpp.convert(env, hf, root / "gguf", precision, opts.rebuild)
                run = (lambda prompt, n, m=model: llamacpp.measure(env, m, len(prompt), n,
                                                                   opts.threads, scratch))
                path, size, seconds = model.path, model.bytes, model.convert_s
                extra = {"pre_tokenizer_fallback": model.pre_tokenizer_fallback}
        except Exception as exc:
            log(f"skipping {label} {precision}: {exc}")
            skipped.append({"what": f"{label} {precision}", "reason": str(exc)})
            continue
        methods.append(Method(f"{name}-{precision}", label, precision, str(path), size, run,
                              peer=True, info={"convert_s": seconds, **extra}))
    return methods, info


def measure_clean(method: Method, prompt: list[int], opts: PeerBenchOptions) -> Sample:
    """One measurement after waiting for idle cores; re-timed while disturbed (the cleanest
    attempt is kept)."""
    from benchmarks.peers.machine import wait_idle
    best = None
    for attempt in range(1 + opts.retries):
        before = wait_idle(opts.wait_idle)
        sample = method.run(prompt, opts.new_tokens)
        sample.cpu_busy_before = before
        sample.extra["attempt"] = attempt + 1
        if best is None or sample.cpu_others < best.cpu_others:
            best = sample
        if not sample.flagged:
            break
        log(f"{method.key}: other processes used {sample.cpu_others:.2f} cores during attempt "
            f"{attempt + 1}")
    return best


def run_rounds(methods: list[Method], opts: PeerBenchOptions, prompt_ids: Callable,
               skipped: list[dict]) -> dict:
    """Interleaved rounds at every context -> {context: {key: [Sample]}}. A peer that fails
    while timed is dropped with one line; our own methods' errors propagate."""
    out: dict = {}
    failed: set[str] = set()
    for context in opts.contexts:
        prompt = prompt_ids(context)
        samples: dict[str, list[Sample]] = {m.key: [] for m in methods}
        for r in range(opts.repeats):
            live = [m for m in methods if m.key not in failed]
            shift = r % max(len(live), 1)
            for m in live[shift:] + live[:shift]:
                log(f"context {context}, round {r + 1}/{opts.repeats}: {m.key}")
                try:
                    s = measure_clean(m, prompt, opts)
                except Exception as exc:
                    if not m.peer:
                        raise
                    log(f"skipping {m.tool} {m.precision}: {exc}")
                    skipped.append({"what": f"{m.tool} {m.precision}", "reason": str(exc)})
                    failed.add(m.key)
                    continue
                samples[m.key].append(s)
                log(f"  TTFT {s.ttft_ms:.1f} ms, {s.ms_per_token:.2f} ms/token, others "
                    f"{s.cpu_others:.2f} cores" + (" (flagged)" if s.flagged else ""))
        out[str(context)] = {k: v for k, v in samples.items() if v and k not in failed}
    return out


def run_peer_bench(opts: PeerBenchOptions) -> int:
    """The whole peers bench; prints the markdown report, writes JSON and the plot."""
    import numpy as np

    from pipo_export.bench import run as bench_run
    from pipo_export.bench.measure import memory_bandwidth_gbs
    from benchmarks.peers import ours, report
    from benchmarks.peers.hf_folder import pipo_ids, write_hf_folder

    check(opts)
    if opts.plot_file:
        bench_run._pyplot()  # fail before the long work, not after
    t0 = time.perf_counter()
    root, ckpt = bench_run.write_checkpoint(opts.shape, opts.layers, opts.workdir, opts.seed,
                                            opts.rebuild)
    config = json.loads((ckpt / "config.json").read_text())
    text = config.get("text_config", config)
    max_context = ours.needed_context(opts.contexts, opts.new_tokens)
    exports, skipped = ours.prepare(ckpt, root, opts.precisions, opts.block_size, max_context,
                                    opts.rebuild)
    methods = our_methods(exports, opts.threads)
    peers_info = {}
    if opts.peers:
        hf = write_hf_folder(ckpt, root / "hf", force=opts.rebuild)
        log(("reusing " if hf.reused else "wrote ") + f"the plain Qwen3.5 folder {hf.folder} "
            f"({hf.tensors} tensors, {hf.bytes / 1e6:.0f} MB)")
        for name in opts.peers:
            found, info = peer_methods(name, hf.folder, root, opts, skipped)
            methods += found
            peers_info[name] = info
    pad, eos = pipo_ids(config)
    top = min([int(text["vocab_size"])] + [i for i in [pad, *eos] if i is not None])

    def prompt_ids(context: int) -> list[int]:
        return np.random.default_rng(context).integers(0, top, context).tolist()

    log("measuring memory bandwidth (numpy copy of 512 MiB)")
    bandwidth = memory_bandwidth_gbs()
    results = run_rounds(methods, opts, prompt_ids, skipped)
    bounds = ours.decode_bounds(ckpt, exports, opts.contexts, opts.new_tokens)
    doc = report.build(opts, text, methods, results, bounds, skipped, peers_info,
                       {**machine_info(), "copy_bandwidth_gbs": bandwidth,
                        "max_context": max_context,
                        "wall_s": time.perf_counter() - t0})
    print(report.markdown(doc))
    if opts.json_file:
        Path(opts.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_file).write_text(json.dumps(doc, indent=2))
        log(f"wrote {opts.json_file}")
    if opts.plot_file:
        report.plot(doc, opts.plot_file)
        log(f"wrote {opts.plot_file}")
    sys.stdout.flush()
    return 0
