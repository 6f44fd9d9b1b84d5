"""llama.cpp: the plain Qwen3.5 folder converted to GGUF (convert_hf_to_gguf.py, f16),
quantized with llama-quantize (q8_0, Q4_K_M, ...), timed with llama-bench."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers import PeerUnavailable, Sample
from benchmarks.peers.machine import Meter
from benchmarks.peers.venvs import PeerEnv, last_line, run_logged

CHILD = Path(__file__).with_name("gguf_child.py")
CONVERTER_TYPES = ("f32", "f16", "bf16")  # written by the converter; others by llama-quantize
PRE_TOKENIZER = "qwen35"  # tokenizer.ggml.pre written for the synthetic vocabulary
BENCH_FIELDS = ("n_prompt", "n_gen", "n_depth", "n_threads", "avg_ns", "samples_ns",
                "model_size", "model_n_params", "model_type", "build_commit", "flash_attn",
                "n_batch", "n_ubatch", "type_k", "type_v")
SEMANTICS = (
    "llama.cpp: convert_hf_to_gguf.py --outtype f16 --no-mtp, then llama-quantize (Q4_K_M is "
    "llama.cpp's mixed recipe: q4_K with q6_K/q5_0/q8_0 tensors, the tied table at q6_K). "
    "Two llama-bench runs, `-t THREADS -r 1 -o json`, each with its own warm-up: TTFT = "
    "`-p PROMPT -n 0` (one llama_decode of the prompt's random ids, only the last token's logits, "
    "no sampling); ms/token = `-p 0 -n N -d PROMPT` time / N (N single-token llama_decode "
    "calls after an untimed PROMPT-token fill, no sampling). n_ctx = prompt + N, KV f16, "
    "flash attention auto.")


@dataclass
class Gguf:
    """One GGUF file of one type."""

    type: str
    path: Path
    bytes: int
    convert_s: float | None = None  # None: reused
    pre_tokenizer_fallback: str | None = None


def _run(cmd: list, logfile: Path, what: str) -> float:
    t0 = time.perf_counter()
    run_logged(cmd, logfile, f"llama.cpp {what}")
    return time.perf_counter() - t0


def convert(env: PeerEnv, hf: Path, out_dir: Path, gguf_type: str, force: bool = False,
            pre: str = PRE_TOKENIZER) -> Gguf:
    """HF folder -> out_dir/model-f16.gguf (converter; the quantization source) ->
    out_dir/model-TYPE.gguf (llama-quantize). Each file written as .tmp and renamed; reused
    when present. `pre`: tokenizer.ggml.pre written when the tokenizer's hash is unknown."""
    hf, out_dir = Path(hf).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = out_dir / "convert.log"
    source = "f16" if gguf_type not in CONVERTER_TYPES else gguf_type
    base = out_dir / f"model-{source}.gguf"
    seconds, fallback = 0.0, None
    if force or not base.is_file():
        tmp = base.with_name(base.name + ".tmp")
        start = logfile.stat().st_size if logfile.is_file() else 0
        seconds += _run([env.python, CHILD, "--llama-dir", env.llama_dir, "--pre", pre,
                         "--", hf, "--outfile", tmp, "--outtype", source, "--no-mtp"],
                        logfile, f"convert_hf_to_gguf ({source})")
        with open(logfile, errors="replace") as f:
            f.seek(start)
            if "pre-tokenizer hash unknown" in f.read():
                fallback = pre
        tmp.rename(base)
    out = out_dir / f"model-{gguf_type}.gguf"
    if out != base and (force or not out.is_file()):
        tmp = out.with_name(out.name + ".tmp")
        seconds += _run([env.tools["llama-quantize"], base, tmp, gguf_type, "2"], logfile,
                        f"llama-quantize {gguf_type}")
        tmp.rename(out)
    return Gguf(gguf_type, out, out.stat().st_size, seconds or None, fallback)


def parse_bench(stdout: str) -> dict:
    """The one test of a `llama-bench -o json` run -> its BENCH_FIELDS."""
    try:
        rows = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise PeerUnavailable(f"llama-bench printed no JSON ({exc})") from None
    if not isinstance(rows, list) or len(rows) != 1:
        raise PeerUnavailable(f"expected one llama-bench result, got "
                              f"{len(rows) if isinstance(rows, list) else type(rows).__name__}")
    row = {k: rows[0].get(k) for k in BENCH_FIELDS}
    if not row["samples_ns"]:
        raise PeerUnavailable("llama-bench result has no samples_ns")
    return row


def llama_bench(env: PeerEnv, gguf: Gguf, threads: int, prompt: int, gen: int, depth: int,
                logfile: Path) -> tuple[dict, float]:
    """One llama-bench test, one repetition (after llama-bench's own warm-up);
    -> (parsed row, cores other processes used meanwhile)."""
    cmd = [str(env.tools["llama-bench"]), "-m", str(gguf.path), "-t", str(threads), "-r", "1",
           "-p", str(prompt), "-n", str(gen), "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]
    meter = Meter().start()
    with open(logfile, "a") as err:
        err.write("\n+ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    others = meter.stop()
    if proc.returncode != 0:
        raise PeerUnavailable(f"llama-bench {gguf.type} failed (exit {proc.returncode}): "
                              f"{last_line(logfile)} (log {logfile})")
    return parse_bench(proc.stdout), others


def sample_from(prefill: dict, decode: dict, new_tokens: int, others: float) -> Sample:
    """TTFT from the prefill test, ms/token from the decode test (first repetition each)."""
    return Sample(prefill["samples_ns"][0] / 1e6, decode["samples_ns"][0] / new_tokens / 1e6,
                  others, extra={"model_type": prefill["model_type"],
                                 "build_commit": prefill["build_commit"],
                                 "flash_attn": prefill["flash_attn"],
                                 "n_ubatch": prefill["n_ubatch"], "type_k": prefill["type_k"],
                                 "decode_depth": decode["n_depth"]})


def measure(env: PeerEnv, gguf: Gguf, prompt_tokens: int, new_tokens: int, threads: int,
            scratch: Path) -> Sample:
    """Prefill and decode tests (two processes); cpu_others is the larger of the two."""
    scratch.mkdir(parents=True, exist_ok=True)
    logfile = scratch / f"llama-bench-{gguf.type}.log"
    prefill, a = llama_bench(env, gguf, threads, prompt_tokens, 0, 0, logfile)
    decode, b = llama_bench(env, gguf, threads, 0, new_tokens, prompt_tokens, logfile)
    return sample_from(prefill, decode, new_tokens, max(a, b))
