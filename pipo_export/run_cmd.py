"""`pipo-export run SOURCE`: generate with one backend and print pairs, tokens, text."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipo_graphs import SamplingParams
from pipo_graphs.semantics import SequenceOutput
from pipo_runtime.backend import Backend
from pipo_runtime.text import encode, load_tokenizer, result_dict

from .errors import PipoError


@dataclass
class RunArgs:
    source: str
    backend: Backend | None = None  # None: torch for a checkpoint, onnxruntime for an export
    ids: list[list[int]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    max_steps: int = 16
    threshold: float = -1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    mtp_context: str = "full"
    dtype: str = "float32"
    json: bool = False


def _is_export(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def generate_torch(args: RunArgs, prompts: list[list[int]]) -> tuple[list[SequenceOutput], object]:
    """Reference decoder on a checkpoint folder."""
    import torch

    from .checkpoint import load_checkpoint
    from .decoder import GenerateOptions, ReferenceDecoder
    from .forward import MtpContext

    model = load_checkpoint(args.source, dtype=getattr(torch, args.dtype))
    dec = ReferenceDecoder(model, mtp_context=MtpContext(args.mtp_context))
    opts = GenerateOptions(max_steps=args.max_steps, threshold=args.threshold,
                           sampling=args.sampling, seed=args.seed,
                           eos_token_ids=tuple(model.config.eos_token_ids))
    return dec.generate(prompts, opts), None


def run(args: RunArgs) -> int:
    folder = Path(args.source)
    if not folder.is_dir():
        raise PipoError(f"{folder}: no such folder (give a checkpoint or an export folder)")
    backend = args.backend or (Backend.ONNXRUNTIME if _is_export(folder) else Backend.TORCH)
    tokenizer = load_tokenizer(folder)
    prompts = list(args.ids) + [encode(tokenizer, text, folder) for text in args.prompts]
    if not prompts:
        raise PipoError("no prompt: pass --ids 5,17,300 or --prompt TEXT")
    if backend == Backend.TORCH:
        if _is_export(folder):
            raise PipoError(f"{folder} is an export; the torch backend runs a checkpoint folder")
        outs, _ = generate_torch(args, prompts)
    else:
        if not _is_export(folder):
            raise PipoError(f"{folder} has no manifest.json; backend {backend.value} runs an "
                            "export folder (pipo-export export CKPT -o OUT)")
        from pipo_runtime.minimal import generate_export
        outs = generate_export(folder, backend, prompts, args)
    results = [result_dict(o, tokenizer) for o in outs]
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
    return 0
