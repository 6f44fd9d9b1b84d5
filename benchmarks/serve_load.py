"""Load test of `python -m pipo_runtime.serve`: N requests from C concurrent clients on
127.0.0.1, then every response checked against the same request run alone through PipoSession,
and the server's RSS sampled as requests complete (flat after the first 100 = no leak).

    pipo-export tiny build/small --shape small
    pipo-export export build/small -o build/small-ort --no-validate
    python benchmarks/serve_load.py build/small-ort --requests 500 --clients 16 --json load.json

Bounded: --requests, --time-limit (seconds for the load phase; later requests count as lost).
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import psutil

WORDS = ("PIPO folds each pair of input tokens into one latent and unfolds every hidden state "
         "into two output tokens while a small confidence head gates the second").split()


def request_body(i: int) -> dict:
    """Request i: a text prompt of 3-20 words, greedy or seeded sampling, 8-48 tokens."""
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 18)]
    body = {"prompt": " ".join(words), "max_tokens": 8 + (i * 5) % 41, "seed": i,
            "return_token_ids": True, "top_p": 1.0}
    body["temperature"] = 0.0 if i % 2 == 0 else 0.9
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pipo_runtime.serve", export, "--port",
                             str(port), "--max-batch", str(args.max_batch), "--threads",
                             str(args.threads), "--generation-config", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become healthy in 300 s")


def load(url: str, pid: int, args: argparse.Namespace) -> tuple[dict, list]:
    results: dict[int, dict] = {}
    rss: list[tuple[int, int]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.time_limit
    server = psutil.Process(pid)

    def one(i: int) -> None:
        if time.monotonic() > stop_at:
            return
        t = time.perf_counter()
        try:
            r = httpx.post(url + "/v1/completions", json=request_body(i), timeout=120)
            out = {"status": r.status_code, "s": time.perf_counter() - t}
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                out.update(tokens=choice["token_ids"], finish=choice["finish_reason"])
            else:
                out["error"] = r.text[:300]
        except httpx.HTTPError as exc:
            out = {"status": None, "error": repr(exc), "s": time.perf_counter() - t}
        with lock:
            results[i] = out
            if len(results) % 25 == 0:
                rss.append((len(results), server.memory_info().rss))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    return {"results": results, "wall_s": wall}, rss


def solo_check(export: str, results: dict[int, dict]) -> list[dict]:
    """The requests whose tokens differ from the same request run alone through PipoSession:
    index, temperature, first differing token, lengths."""
    from pipo_graphs import SamplingParams
    from pipo_runtime import GenerationConfig, PipoSession
    session = PipoSession.load(export)
    bad = []
    for i, out in sorted(results.items()):
        if out.get("status") != 200:
            continue
        b = request_body(i)
        ids = session.tokenizer.encode(b["prompt"], add_special_tokens=False).ids
        config = GenerationConfig(max_new_tokens=b["max_tokens"], seed=b["seed"],
                                  sampling=SamplingParams(temperature=b["temperature"]))
        seq = session.generate([ids], replace(config, seq_offset=0)).sequences[0]
        if seq.tokens != out["tokens"]:
            first = next((k for k, (a, c) in enumerate(zip(seq.tokens, out["tokens"]))
                          if a != c), min(len(seq.tokens), len(out["tokens"])))
            bad.append({"request": i, "temperature": b["temperature"], "first_diff": first,
                        "solo_len": len(seq.tokens), "served_len": len(out["tokens"])})
    session.close()
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=1200)
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args()
    port = free_port()
    proc = start_server(args.export, port, args)
    try:
        run, rss = load(f"http://127.0.0.1:{port}", proc.pid, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    results = run["results"]
    ok = {i: r for i, r in results.items() if r["status"] == 200}
    mismatched = solo_check(args.export, ok)
    lat = sorted(r["s"] for r in ok.values())
    after = [b for n, b in rss if n >= 100]
    report = {
        "requests": args.requests, "clients": args.clients, "max_batch": args.max_batch,
        "answered": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "lost": args.requests - len(results), "mismatched_vs_solo": len(mismatched),
        "wall_s": round(run["wall_s"], 1),
        "requests_per_s": round(len(ok) / run["wall_s"], 2),
        "output_tokens_per_s": round(sum(len(r["tokens"]) for r in ok.values()) / run["wall_s"],
                                     1),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "rss_mib": [(n, round(b / 2**20, 1)) for n, b in rss],
        "rss_growth_after_100_mib": round((max(after) - after[0]) / 2**20, 1) if after else None,
        "server_exit_code": code,
        "error_samples": [r.get("error") for r in results.values() if r["status"] != 200][:3],
        "mismatches": mismatched,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if not (report["errors"] or report["lost"] or mismatched or code) else 1


if __name__ == "__main__":
    sys.exit(main())
