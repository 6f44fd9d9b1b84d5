"""Serving benchmark: pipo-export's OpenAI-compatible server against llama.cpp's llama-server,
N concurrent streaming clients on 127.0.0.1 (issue 20, item 4). Run at the repository root;
the inputs are the peers bench's (random weights, full-depth Qwen3.5-0.8B shape): our int4 PIPO
export and the Q4_K_M GGUF of the same weights under build/bench/qwen3.5-0.8b-L24/, and
llama-server under build/peers/llamacpp/build/bin:

    python -m benchmarks.peers --peers llamacpp --precisions int4 --gguf-types Q4_K_M \\
        --contexts 1024 --repeats 1
    python -m benchmarks.serve_vs_llamacpp --clients 1,2,4,8,16 \\
        --json benchmarks/results/serve_vs_llamacpp.json \\
        --plot benchmarks/results/serve_vs_llamacpp.png

Per N, each server runs alone, one after the other (the order alternates with N): ours as
`python -m pipo_runtime.serve EXPORT --max-batch N --threads T`, llama-server as `-m GGUF -np N
-t T --metrics -c N*(prompt + new tokens + 16)` and `--cache-ram 0` when it has the flag (no
prompt cache on either side). After /health answers 200 and --warmup requests (full prompt,
8 tokens), N clients (one openai.AsyncOpenAI) each send --requests-per-client streaming
/v1/completions requests in turn: --prompt-tokens random token ids (seeded, different per
request, the same for both servers), --new-tokens tokens, temperature 0, ignore_eos. Then
SIGTERM (SIGKILL after --stop-timeout s), also on errors and Ctrl-C.

Measured per N x server (units in the JSON keys):
- output tokens/s: completion tokens (`usage`) / wall time from first send to last finish;
- TTFT: send to the first chunk carrying a generated token; tokens per chunk: ours from
  `token_ids` (return_token_ids), llama-server from the growth of `timings.predicted_n`
  (timings_per_token; without it one per chunk with text). llama-server holds a token back
  while its text ends inside a UTF-8 sequence (frequent with random weights over a byte-level
  vocabulary), so its first chunk can come a token late; ours sends ids at once;
- ITL: the gap between two token-carrying chunks of a request / the tokens the later one
  carries (ours: up to two, a PIPO step emits a pair), one value per token, over all requests
  (chunks that reach the client in a burst make its p50 small); TPOT: per request, (last token
  - first token time) / (tokens - 1), p50 over requests;
- server CPU seconds (psutil, user + system of the process tree) in the load phase and the
  cores that makes; peak RSS of the tree sampled every --sample-interval s, and VmHWM (peak
  since start, loading included); others_cores: cores the rest of the machine used meanwhile
  (/proc/stat busy time minus the server's and this client's), >= 0.25 marks a disturbed run.

Bounded: a load phase stops after --time-limit s (running requests are cancelled, the row is
marked timed out), a startup after --start-timeout s. Exit 2 when an input is missing, 1 when a
request failed or a run timed out.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipo_export.cli.flags import OneLineParser, ids, names
from benchmarks.peers import BUSY_CORES
from benchmarks.peers.machine import cpu_seconds
from benchmarks.peers.machine import machine_info
from benchmarks.serving import (BenchError, RssSampler, ServerProcess, drive, free_port, pct,
    scrape_metrics, timings_count, token_ids_count, tree, vm_hwm_mib)

ROOT = "build/bench/qwen3.5-0.8b-L24"  # the peers bench's --workdir / shape-L<layers>
BUILD_HINT = ("the peers bench makes it: `python -m benchmarks.peers --peers llamacpp "
              "--precisions int4 --gguf-types Q4_K_M --contexts 1024 --repeats 1`")
SERVERS = ("pipo", "llamacpp")
MODEL = "bench"  # the model name both servers answer to
CTX_MARGIN = 16  # tokens per llama-server slot beyond prompt + new tokens
WARMUP_TOKENS = 8


@dataclass
class Options:
    """Every knob (the CLI fills it)."""

    export: str = f"{ROOT}/pipo-int4"
    gguf: str = f"{ROOT}/gguf/model-Q4_K_M.gguf"
    llama_server: str = "build/peers/llamacpp/build/bin/llama-server"
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    requests_per_client: int = 2
    prompt_tokens: int = 1024
    new_tokens: int = 128
    threads: int = 2
    threshold: float | None = None  # ours' tau; None: the server's default (-1: every pair)
    seed: int = 0
    warmup: int = 1
    time_limit: float = 900.0  # seconds per load phase (one N, one server)
    start_timeout: float = 600.0
    stop_timeout: float = 60.0
    sample_interval: float = 0.25  # seconds between RSS samples
    pipo_args: str = ""  # more flags for our server (shell syntax)
    llama_args: str = ""  # more flags for llama-server (shell syntax)
    log_dir: str = "build/serve_vs_llamacpp"
    json_file: str | None = None
    plot_file: str | None = None


def log(text: str) -> None:
    print(f"[serve-bench] {text}", file=sys.stderr, flush=True)


def prompt_ids(opts: Options, top: int, index: int) -> list[int]:
    """Request `index`'s prompt: --prompt-tokens ids in [0, top), from (seed, index)."""
    return np.random.default_rng([opts.seed, index]).integers(0, top, opts.prompt_tokens).tolist()


def llama_probe(binary: str) -> dict:
    """llama-server's --version lines and whether it has --cache-ram."""
    def run(flag: str) -> str:
        try:
            return subprocess.run([binary, flag], stdout=subprocess.PIPE, text=True, timeout=60,
                                  stderr=subprocess.STDOUT).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
    return {"version": [x for x in run("--version").splitlines() if x.strip()][-2:],
            "cache_ram": "--cache-ram" in run("--help")}


def make_server(name: str, n: int, opts: Options, probe: dict) -> ServerProcess:
    """Our server (--max-batch N) or llama-server (-np N) for N clients, on a free port."""
    port, logfile = free_port(), Path(opts.log_dir) / f"{name}-N{n}.log"
    if name == "pipo":
        cmd = [sys.executable, "-m", "pipo_runtime.serve", opts.export, "--port", str(port),
               "--max-batch", str(n), "--threads", str(opts.threads), "--generation-config",
               "none", "--served-model-name", MODEL, "--max-queue",
               str(max(64, n * opts.requests_per_client)), *shlex.split(opts.pipo_args)]
        extra = {"ignore_eos": True, "return_token_ids": True}
        if opts.threshold is not None:
            extra["threshold"] = opts.threshold
        return ServerProcess(name, cmd, port, logfile, extra, token_ids_count)
    ctx = n * (opts.prompt_tokens + opts.new_tokens + CTX_MARGIN)
    cmd = [opts.llama_server, "-m", opts.gguf, "-np", str(n), "-t", str(opts.threads),
           "--metrics", "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port),
           "--alias", MODEL, *(["--cache-ram", "0"] if probe.get("cache_ram") else []),
           *shlex.split(opts.llama_args)]
    return ServerProcess(name, cmd, port, logfile, {"ignore_eos": True,
                                                    "timings_per_token": True}, timings_count)


def measure(server: ServerProcess, n: int, prompts: list[list[int]], warm: list[int],
            opts: Options) -> dict:
    """Start the server, warm it up, run the load phase, stop it; -> the row."""
    log(f"N={n}: starting {server.name}: {shlex.join(server.cmd)}")
    t0 = time.perf_counter()
    try:
        server.start(opts.start_timeout)
        start_s = time.perf_counter() - t0
        for _ in range(opts.warmup):
            rec = asyncio.run(drive(server, [warm], 1, MODEL, WARMUP_TOKENS,
                                    opts.time_limit))[0][0]
            if rec["error"]:
                raise BenchError(f"{server.name} failed the warm-up request: {rec['error']}")
        pid = server.proc.pid
        sampler = RssSampler(pid, opts.sample_interval)
        sampler.start()
        cpu0, busy0, own0 = tree(pid)[0], cpu_seconds(), time.process_time()
        try:
            records, itl, timed_out = asyncio.run(drive(server, prompts, n, MODEL,
                                                        opts.new_tokens, opts.time_limit))
        finally:
            sampler.done.set()
            sampler.join()
        cpu, own = tree(pid)[0] - cpu0, time.process_time() - own0
        others, hwm = cpu_seconds() - busy0 - cpu - own, vm_hwm_mib(pid)
        metrics = scrape_metrics(server.url)
    finally:
        code = server.stop(opts.stop_timeout)
    ok = [r for r in records if not r["error"]]
    wall = max(r["end_s"] for r in records) - min(r["send_s"] for r in records)
    tokens = sum(r["tokens"] if r["usage_tokens"] is None else r["usage_tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    row = {
        "server": server.name, "clients": n, "sent": len(records), "ok": len(ok),
        "timed_out": timed_out, "wall_s": round(wall, 3), "completion_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
        "tpot_ms_p50": pct([r["tpot_s"] for r in ok if "tpot_s" in r], 50),
        "tokens_per_chunk": round(sum(r["tokens"] for r in ok)
                                  / max(1, sum(r["chunks"] for r in ok)), 3),
        "counted_vs_usage_mismatches": sum(1 for r in ok if r["usage_tokens"] not in
                                           (None, r["tokens"])),
        "server_cpu_s": round(cpu, 2), "server_cores": round(cpu / wall, 3),
        "client_cpu_s": round(own, 2), "others_cores": round(max(0.0, others) / wall, 3),
        "peak_rss_mib": round(sampler.peak / 2**20, 1), "vm_hwm_mib": hwm,
        "startup_s": round(start_s, 2), "exit_code": code, "command": server.cmd,
        "errors": [r["error"] for r in records if r["error"]][:5],
        "server_metrics": metrics,
        "requests": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                      if k not in ("send_s", "end_s")} for r in records]}
    log(f"N={n} {server.name}: {row['ok']}/{row['sent']} ok, {row['output_tokens_per_s']} "
        f"tokens/s, TTFT p50 {row['ttft_ms_p50']} ms, ITL p50 {row['itl_ms_p50']} ms")
    return row


# ---------------------------------------------------------------------------- report
def markdown(rows: list[dict]) -> str:
    lines = ["| N | server | ok/sent | output tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 "
             "ms/token | TPOT p50 ms | server CPU s (cores) | peak RSS MiB | others cores |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['server']} | {r['ok']}/{r['sent']}"
            f"{' (timed out)' if r['timed_out'] else ''} | {r['output_tokens_per_s']} | "
            f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']} | {r['itl_ms_p50']} / {r['itl_ms_p99']} | "
            f"{r['tpot_ms_p50']} | {r['server_cpu_s']} ({r['server_cores']}) | "
            f"{r['peak_rss_mib']} | {r['others_cores']}"
            f"{' (disturbed)' if r['others_cores'] >= BUSY_CORES else ''} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Four panels over N, one line per server."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_ms_p50", "TTFT p50 (ms)"),
              ("tpot_ms_p50", "TPOT p50 (ms/token)"), ("peak_rss_mib", "peak RSS (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ns = sorted({r["clients"] for r in rows})
    for ax, (key, label) in zip(axes, panels):
        for name in SERVERS:
            pts = [(r["clients"], r[key]) for r in rows
                   if r["server"] == name and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set(xlabel="concurrent clients N", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = OneLineParser(prog="python -m benchmarks.serve_vs_llamacpp",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--export", default=d.export, help=f"our export (default {d.export})")
    p.add_argument("--gguf", default=d.gguf, help=f"llama-server's model (default {d.gguf})")
    p.add_argument("--llama-server", default=d.llama_server, help=f"default {d.llama_server}")
    p.add_argument("--servers", type=names, default=d.servers, help="pipo,llamacpp (default)")
    p.add_argument("--clients", type=ids, default=d.clients,
                   help="concurrent clients N, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--requests-per-client", type=int, default=d.requests_per_client)
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--threads", type=int, default=d.threads, help="of each server")
    p.add_argument("--threshold", type=float, default=None,
                   help="our confidence gate tau (default: the server's, -1 = every pair)")
    p.add_argument("--seed", type=int, default=d.seed, help="of the prompts' token ids")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="unmeasured requests after startup (full prompt, 8 tokens)")
    p.add_argument("--time-limit", type=float, default=d.time_limit,
                   help="seconds per load phase (one N, one server)")
    p.add_argument("--start-timeout", type=float, default=d.start_timeout, help="seconds")
    p.add_argument("--stop-timeout", type=float, default=d.stop_timeout, help="seconds")
    p.add_argument("--sample-interval", type=float, default=d.sample_interval,
                   help="seconds between RSS samples")
    p.add_argument("--pipo-args", default=d.pipo_args, help="more flags for our server")
    p.add_argument("--llama-args", default=d.llama_args, help="more flags for llama-server")
    p.add_argument("--log-dir", default=d.log_dir, help="where the servers' logs go")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE")
    p.add_argument("--plot", dest="plot_file", default=None, metavar="FILE.png")
    return p


def check_inputs(opts: Options) -> str | None:
    """The one line naming a bad option or a missing input, or None."""
    bad = [s for s in opts.servers if s not in SERVERS]
    if bad or not opts.servers:
        return f"--servers takes {','.join(SERVERS)}, got {','.join(bad) or 'none'}"
    if min(opts.clients + [opts.requests_per_client, opts.prompt_tokens, opts.threads]) < 1 \
            or opts.new_tokens < 2:
        return ("--clients, --requests-per-client, --prompt-tokens and --threads must be >= 1, "
                "--new-tokens >= 2")
    if not (Path(opts.export) / "manifest.json").is_file():
        return f"no export at {opts.export}: {BUILD_HINT}"
    if "llamacpp" in opts.servers and not os.access(opts.llama_server, os.X_OK):
        return f"no llama-server at {opts.llama_server}: {BUILD_HINT}"
    if "llamacpp" in opts.servers and not Path(opts.gguf).is_file():
        return f"no GGUF at {opts.gguf}: {BUILD_HINT}"
    return None


def main(argv: list[str] | None = None) -> int:
    opts = Options(**vars(build_parser().parse_args(argv)))
    problem = check_inputs(opts)
    if problem:
        print(f"serve_vs_llamacpp: {problem}", file=sys.stderr)
        return 2
    from pipo_graphs.manifest import load_manifest
    model = load_manifest(opts.export, verify_files=False).model
    need = opts.prompt_tokens + opts.prompt_tokens % 2 + 2 * opts.new_tokens
    if need > model.max_context:
        print(f"serve_vs_llamacpp: {opts.export} allows {model.max_context} tokens of context, "
              f"the requests need {need}: export with a larger --max-context", file=sys.stderr)
        return 2
    if opts.plot_file and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        opts.plot_file = None
    top = min([model.vocab_size, model.pad_token_id, *model.eos_token_ids])  # below specials
    warm = prompt_ids(opts, top, 10**6)
    probe = llama_probe(opts.llama_server) if "llamacpp" in opts.servers else {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop, report
    rows: list[dict] = []
    failures: list[str] = []
    try:
        for k, n in enumerate(opts.clients):
            prompts = [prompt_ids(opts, top, i) for i in range(n * opts.requests_per_client)]
            for name in (opts.servers if k % 2 == 0 else opts.servers[::-1]):
                try:
                    rows.append(measure(make_server(name, n, opts, probe), n, prompts, warm,
                                        opts))
                except BenchError as exc:  # this server at this N; the others go on
                    log(f"N={n} {name}: {exc}")
                    failures.append(f"N={n} {name}: {exc}")
    except KeyboardInterrupt:
        log("interrupted: the server was stopped; reporting what finished")
    doc = {"argv": sys.argv, "options": asdict(opts), "machine": machine_info(),
           "llama_server": probe,
           "export": {"path": opts.export, "vocab_size": model.vocab_size,
                      "max_context": model.max_context, "prompt_id_bound": top},
           "semantics": "Measured" + __doc__.split("\n\nMeasured")[1].split("\n\nBounded")[0],
           "runs": rows, "failures": failures}
    print(markdown(rows))
    if opts.json_file:
        Path(opts.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_file).write_text(json.dumps(doc, indent=2))
        log(f"wrote {opts.json_file}")
    if opts.plot_file and rows:
        plot(rows, opts.plot_file)
        log(f"wrote {opts.plot_file}")
    complete = len(rows) == len(opts.clients) * len(opts.servers)
    return 0 if complete and all(r["ok"] == r["sent"] and not r["timed_out"] for r in rows) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
