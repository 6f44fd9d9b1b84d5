"""`pipo-export run SOURCE`: generate with one backend and print pairs, tokens, text.

Every backend goes through PipoSession's loop: an export folder on any backend, a checkpoint
folder (or a PEFT adapter folder with --base) on the torch backend."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipo_graphs import SamplingParams
from pipo_graphs.manifest import MANIFEST
from pipo_runtime.backends import Backend, backend_module
from pipo_runtime.backends.base import RunnerOptions
from pipo_runtime.session import DEFAULT_MAX_STEPS
from pipo_runtime.text import result_dict

from pipo_export.cli.flags import DTYPES, add_backend_flags, add_generation_flags, \
    add_source_flags, backend_from, max_steps_from, providers_from, sampling_from
from pipo_export.errors import PipoError


@dataclass
class RunArgs:
    source: str | None
    backend: Backend | None = None  # None: torch for a checkpoint, onnxruntime for an export
    ids: list[list[int]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    max_steps: int | None = DEFAULT_MAX_STEPS
    max_new_tokens: int | None = None
    threshold: float = -1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    base: str | None = None  # the Qwen3.5 base of a PEFT adapter folder (torch)
    adapters: list[str] = field(default_factory=list)  # more adapters merged after `source`
    dtype: str = RunnerOptions.dtype  # torch on a checkpoint folder
    json: bool = False
    stream: bool = False
    providers: list[str] = field(default_factory=lambda: list(RunnerOptions.providers))
    threads: int = RunnerOptions.threads


def _adapter(folder: Path) -> bool:
    from pipo_export.model.adapters import is_adapter_folder
    return is_adapter_folder(folder)


def _is_export(folder: Path) -> bool:
    return (folder / MANIFEST).exists()


def generate(args: RunArgs, backend: Backend) -> list[dict]:
    """PipoSession on `backend`; prints tokens (or text) as they come with --stream."""
    from pipo_runtime.session import GenerationConfig, PipoSession

    session = PipoSession.load(args.source, backend=backend, providers=tuple(args.providers),
                               threads=args.threads, base=args.base,
                               adapters=tuple(args.adapters), dtype=args.dtype)
    config = GenerationConfig(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                              threshold=args.threshold, sampling=args.sampling, seed=args.seed,
                              stop_token_ids=tuple(args.stop_token_ids),
                              stop_strings=tuple(args.stop_strings))
    prompts = list(args.ids) + list(args.prompts)
    show = args.stream and not args.json
    as_text = session.tokenizer is not None
    try:
        stream = session.stream(prompts, config)
        for event in stream:
            piece = event.text if as_text else " ".join(map(str, event.tokens)) + " "
            if show and piece and len(prompts) > 1:
                print(f"[{event.row}] {piece}", flush=True)
            elif show and piece:
                print(piece, end="", flush=True)
        if show and len(prompts) == 1:
            print()
    finally:
        session.close()
    r = stream.result
    timings = {"ttft_ms": round(r.ttft_s * 1e3, 3), "ms_per_step": round(r.ms_per_step, 3),
               "ms_per_token": round(r.ms_per_token, 3), "steps": r.steps}
    results = []
    for seq in r.sequences:
        d = result_dict(seq)
        if seq.text is not None:
            d["text"] = seq.text
        results.append(dict(d, timings=timings))
    return results


def run(args: RunArgs) -> int:
    if not args.source and args.adapters:  # --base BASE --adapter A [--adapter B ...]
        args = replace(args, source=args.adapters[0], adapters=args.adapters[1:])
    if not args.source:
        raise PipoError("no model: give a checkpoint or export folder, or --base BASE "
                        "--adapter ADAPTER")
    folder = Path(args.source)
    if not folder.is_dir():
        raise PipoError(f"{folder}: no such folder (give a checkpoint or an export folder)")
    if not args.ids and not args.prompts:
        raise PipoError("no prompt: pass --ids 5,17,300 or --prompt TEXT")
    if not _is_export(folder) and not (folder / "config.json").exists() \
            and not _adapter(folder):
        raise PipoError(f"{folder}: neither an export folder (no {MANIFEST}) nor a checkpoint "
                        "folder (no config.json)")
    backend = args.backend or (Backend.ONNXRUNTIME if _is_export(folder) else Backend.TORCH)
    if _is_export(folder) and args.adapters and backend != Backend.TORCH:
        raise PipoError(f"{folder} is an export folder: its weights are fixed, --adapter applies "
                        "to checkpoints (export with --adapter, or run with --backend torch)")
    if not _is_export(folder) and not getattr(backend_module(backend), "RUNS_CHECKPOINTS", False):
        raise PipoError(f"{folder} has no {MANIFEST}; backend {backend.value} runs an "
                        "export folder (pipo-export export CKPT -o OUT)")
    results = generate(args, backend)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"results": results}), flush=True)
        return 0
    for i, r in enumerate(results):
        head = f"[{i}] " if len(results) > 1 else ""
        print(f"{head}tokens: {r['tokens']}")
        if "text" in r:
            print(f"{head}text: {r['text']!r}")
        print(f"{head}pairs: {r['pairs']}  commit rate {r['commit_rate']:.2f}  "
              f"finish: {r['finish_reason']}")
        if "timings" in r and i == len(results) - 1:
            t = r["timings"]
            print(f"{backend.value}: time to first pair {t['ttft_ms']:.1f} ms, "
                  f"{t['ms_per_step']:.2f} ms/step, {t['ms_per_token']:.2f} ms/token")
    return 0


DEFAULTS = RunArgs(source="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_flags(p, "source", help="checkpoint folder, PEFT adapter folder (with --base) or "
                                       "export folder")
    add_backend_flags(p, "default: torch for a checkpoint, onnxruntime for an export")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype,
                   help="torch backend dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    add_generation_flags(p, DEFAULTS.threshold, DEFAULTS.sampling, DEFAULTS.seed)


def command(ns: argparse.Namespace) -> int:
    return run(RunArgs(source=ns.source, backend=backend_from(ns), ids=ns.ids, prompts=ns.prompt,
                       max_steps=max_steps_from(ns), max_new_tokens=ns.max_new_tokens,
                       stop_token_ids=tuple(ns.stop_token_ids), stop_strings=tuple(ns.stop),
                       threshold=ns.threshold, sampling=sampling_from(ns), seed=ns.seed,
                       base=ns.base, adapters=list(ns.adapters), dtype=ns.dtype, json=ns.json, stream=ns.stream,
                       providers=providers_from(ns), threads=ns.threads))
