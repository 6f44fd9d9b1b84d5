"""ONNX Runtime GenAI: its model builder on the plain Qwen3.5 folder, then timed runs through
onnxruntime_genai's Python API in the peer venv (ortgenai_child)."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipo_export.bench import folder_bytes
from benchmarks.peers import PeerUnavailable, Sample
from benchmarks.peers.venvs import PeerEnv, last_line, log

CHILD = Path(__file__).with_name("ortgenai_child.py")
PRECISIONS = ("int4", "int8", "fp32")  # what the builder accepts for the CPU provider
SEMANTICS = (
    "onnxruntime-genai: model builder `-p PRECISION -e cpu --extra_options prune_lm_head=true` "
    "(+ exclude_mtp=true when the config declares MTP); int4/int8 = MatMulNBits, block 32, "
    "accuracy_level 4 (int8 activations), tied table quantized too. TTFT = append_tokens(prompt) "
    "(the prefill, last-position logits only) + the first generate_next_token (a greedy pick, no "
    "forward); ms/token = mean of the other N-1 generate_next_token calls (one decode forward + "
    "greedy pick + Python call). KV buffer sized to prompt + N. Each measurement: load, one "
    "warm-up run, one timed run, in a fresh process.")


@dataclass
class GenaiModel:
    """A converted model folder of one precision."""

    precision: str
    folder: Path
    bytes: int
    convert_s: float | None = None  # None: reused


def builder_options(hf_config: dict) -> list[str]:
    """--extra_options for the builder: last-token logits only in prefill (llama.cpp computes
    only the last token's too); the released config declares an MTP layer, which the builder
    would export as mtp.onnx and which refuses prune_lm_head, so it is excluded."""
    text = {**hf_config, **hf_config.get("text_config", {})}
    options = ["prune_lm_head=true"]
    if int(text.get("mtp_num_hidden_layers") or 0) > 0:
        options.append("exclude_mtp=true")
    return options


def convert(env: PeerEnv, hf: Path, out: Path, precision: str, force: bool = False) -> GenaiModel:
    """`python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu`, written
    to a temporary sibling and renamed; reused when present. Output in OUT.log."""
    hf, out = Path(hf).resolve(), Path(out).resolve()
    if precision not in PRECISIONS:
        raise PeerUnavailable(f"onnxruntime-genai precision {precision!r} is not one of "
                              f"{', '.join(PRECISIONS)} (CPU)")
    if (out / "genai_config.json").is_file() and not force:
        return GenaiModel(precision, out, folder_bytes(out))
    shutil.rmtree(out, ignore_errors=True)
    tmp, cache = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".cache")
    shutil.rmtree(tmp, ignore_errors=True)
    options = builder_options(json.loads((hf / "config.json").read_text()))
    cmd = [str(env.python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
           str(tmp), "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options", *options]
    logfile = out.with_name(out.name + ".log")
    log(f"onnxruntime-genai: building {precision} model in {out} (log {logfile})")
    log("+ " + " ".join(cmd))
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise PeerUnavailable(f"onnxruntime-genai model builder failed for {precision} (exit "
                              f"{proc.returncode}): {last_line(logfile)} (log {logfile})")
    tmp.rename(out)
    return GenaiModel(precision, out, folder_bytes(out), time.perf_counter() - t0)


def measure(env: PeerEnv, model: GenaiModel, prompt: list[int], new_tokens: int,
            threads: int, scratch: Path) -> Sample:
    """One measurement in a fresh process of the peer venv: load, warm-up, timed run."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec_file = scratch / f"genai-{model.precision}-spec.json"
    spec_file.write_text(json.dumps({"model": str(model.folder), "prompt": prompt,
                                     "new_tokens": new_tokens, "threads": threads,
                                     "warmup": 1, "spin": True}))
    logfile = scratch / f"genai-{model.precision}-run.log"
    with open(logfile, "w") as err:
        proc = subprocess.run([str(env.python), str(CHILD), str(spec_file)],
                              stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"onnxruntime-genai {model.precision} run failed (exit "
                              f"{proc.returncode}): {last_line(logfile)} (log {logfile})")
    out = json.loads(proc.stdout)
    return Sample(out["ttft_ms"], out["ms_per_token"], round(out["cpu_others"], 3),
                  extra={"generated": out["generated"], "load_s": round(out["load_s"], 3),
                         "session_options": out["session_options"],
                         "versions": out["versions"]})
