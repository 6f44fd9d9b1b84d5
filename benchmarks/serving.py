"""Parts of a serving benchmark (benchmarks/serve_vs_llamacpp.py): an OpenAI-compatible server
process on a free 127.0.0.1 port (started in its own session, ready when /health answers 200,
stopped with SIGTERM then SIGKILL), N streaming clients against it (`drive`), and the CPU time
and RSS of its process tree.

    server = ServerProcess("pipo", [sys.executable, "-m", "pipo_runtime.serve", OUT, "--port",
                                    str(port)], port, Path("pipo.log"), {"ignore_eos": True},
                           count=token_ids_count)
    server.start(600)
    try:
        records, itl, timed_out = asyncio.run(drive(server, prompts, clients=4, model="m",
                                                    new_tokens=128, time_limit=900))
    finally:
        server.stop(60)
"""
from __future__ import annotations

import asyncio
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


class BenchError(Exception):
    """A server failed to start or to answer; the message is the one line printed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(path: Path) -> str:
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def token_ids_count(chunk, seen: int) -> tuple[int, int]:
    """(tokens a streamed completion chunk carries, tokens so far), from its choices'
    `token_ids` (vLLM's and pipo-export's return_token_ids)."""
    n = sum(len(getattr(c, "token_ids", None) or ()) for c in chunk.choices)
    return n, seen + n


def timings_count(chunk, seen: int) -> tuple[int, int]:
    """The same from llama-server's `timings.predicted_n` (timings_per_token: tokens decoded
    so far); a chunk without it counts one token per choice with text."""
    timings = getattr(chunk, "timings", None)
    if isinstance(timings, dict) and "predicted_n" in timings:
        return max(0, timings["predicted_n"] - seen), max(seen, timings["predicted_n"])
    n = sum(1 for c in chunk.choices if c.text)
    return n, seen + n


@dataclass
class ServerProcess:
    """One server: its command (which must bind `port` on 127.0.0.1), its log, the fields every
    request adds (extra_body) and how its streamed chunks count tokens."""

    name: str
    cmd: list[str]
    port: int
    logfile: Path
    extra_body: dict
    count: Callable[[object, int], tuple[int, int]] = token_ids_count
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        """Start it and wait until /health answers 200 (BenchError after `timeout` s or when
        it exits)."""
        import httpx
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "w") as out:
            out.write("+ " + shlex.join(self.cmd) + "\n")
            out.flush()  # its own session: Ctrl-C reaches only the bench, which stops it
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} while "
                                 f"starting: {last_line(self.logfile)} (log {self.logfile})")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise BenchError(f"{self.name} was not healthy after {timeout:.0f} s (log {self.logfile})")

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, SIGKILL after `timeout` s; -> exit code (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def drive(server: ServerProcess, prompts: list[list[int]], clients: int, model: str,
                new_tokens: int, time_limit: float) -> tuple[list[dict], list[float], bool]:
    """`clients` concurrent clients (one openai.AsyncOpenAI, no retries), client c sending
    prompts[c * k : (c + 1) * k] (k = len(prompts) // clients) one after another as streaming
    /v1/completions, greedy, `new_tokens` each, seed = the prompt's index. Requests still
    running after `time_limit` s are cancelled (error "cancelled at the time limit").

    -> (records: one per request sent, {request, client, ttft_s, tokens, chunks, usage_tokens,
    tpot_s, error, send_s, end_s} (perf_counter seconds); ITL in s per token of the answered
    requests (a chunk's gap since the previous token-carrying chunk / its tokens); timed out)."""
    import openai
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                timeout=time_limit)
    records: list[dict] = []
    itl: list[float] = []
    per_client = len(prompts) // clients

    async def one(i: int, client_index: int) -> None:
        rec = {"request": i, "client": client_index, "ttft_s": None, "tokens": 0, "chunks": 0,
               "usage_tokens": None, "error": None, "send_s": time.perf_counter()}
        records.append(rec)
        last, seen, gaps = None, 0, []
        try:
            stream = await client.completions.create(
                model=model, prompt=prompts[i], max_tokens=new_tokens, temperature=0.0, seed=i,
                stream=True, stream_options={"include_usage": True},
                extra_body=server.extra_body)
            async for chunk in stream:
                t = time.perf_counter()
                if chunk.usage is not None:
                    rec["usage_tokens"] = chunk.usage.completion_tokens
                k, seen = server.count(chunk, seen)
                if k > 0:
                    if last is None:
                        rec["ttft_s"] = t - rec["send_s"]
                    else:
                        gaps += [(t - last) / k] * k
                    last, rec["tokens"], rec["chunks"] = t, rec["tokens"] + k, rec["chunks"] + 1
            itl.extend(gaps)
            if rec["tokens"] > 1:
                rec["tpot_s"] = (last - rec["send_s"] - rec["ttft_s"]) / (rec["tokens"] - 1)
        except Exception as exc:  # recorded; the bench goes on
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rec["end_s"] = time.perf_counter()

    async def client_loop(c: int) -> None:
        for r in range(per_client):
            await one(c * per_client + r, c)

    tasks = [asyncio.ensure_future(client_loop(c)) for c in range(clients)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    for rec in records:
        if "end_s" not in rec:
            rec.update(end_s=time.perf_counter(), error="cancelled at the time limit")
    return records, itl, bool(pending)


def scrape_metrics(url: str) -> dict:
    """The server's Prometheus /metrics samples without histogram buckets:
    {"name{labels}": value}."""
    import httpx
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    out = {}
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key and not line.startswith("#") and "_bucket" not in key:
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


# ---------------------------------------------------------------------------- process tree
def tree(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, RSS bytes) of a process and its children, live or waited."""
    import psutil
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, 0
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
            rss += p.memory_info().rss
        except psutil.NoSuchProcess:  # a child that just exited
            pass
    return cpu, rss


def vm_hwm_mib(pid: int) -> float | None:
    """The process's peak resident set since it started (Linux VmHWM), MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((round(int(x.split()[1]) / 1024, 1) for x in lines if x.startswith("VmHWM:")),
                None)


class RssSampler(threading.Thread):
    """The peak RSS (bytes) of a process tree, sampled every `interval` s until `done` is set."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.done = pid, interval, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, tree(self.pid)[1])
            self.done.wait(self.interval)


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile of seconds, in ms (None for no values)."""
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None
