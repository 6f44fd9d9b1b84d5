"""`pipo-export inspect CKPT`: what the loader finds in a checkpoint folder."""
from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipo_export.cli.flags import add_source_flags
from pipo_export.errors import PipoError


@dataclass
class InspectArgs:
    checkpoint: str | None
    json: bool = False
    base: str | None = None  # the Qwen3.5 base of a PEFT adapter folder
    adapters: list[str] = field(default_factory=list)  # more adapters, merged in order


def module_of(key: str) -> str:
    """Group a parameter key by top-level PIPO module (backbone split into its parts)."""
    if key.startswith("model.layers."):
        return "backbone.layers"
    if key.startswith("model."):
        return "backbone." + key.split(".")[1]
    return key.split(".")[0]


def check_finite(source) -> None:
    """Read every tensor once (one at a time; adapters merged): a NaN or Inf anywhere is a
    CheckpointError naming the tensor (the sources check each tensor they read)."""
    for key in source.names():
        source.get(key)


def inspect_report(path: str | None, base: str | None = None, adapters=()) -> dict:
    """What the loader finds: layout, dims, parameter counts per module, problems (names,
    shapes, missing modules); every tensor is read once to refuse NaN or Inf."""
    from pipo_export.model.adapters import is_adapter_folder
    from pipo_export.model.checkpoint import CheckpointLayout, open_checkpoint
    from pipo_export.model.config import load_config
    from pipo_export.model.source import SafetensorsSource

    problems, counts = [], Counter()
    try:
        cfg, source, layout = open_checkpoint(path, base, adapters)
    except PipoError as exc:  # names or shapes do not fit: show the config and the problem
        if path is None or adapters or is_adapter_folder(path):
            raise
        cfg, problems = load_config(Path(path)), [str(exc)]
        source = SafetensorsSource.open(path)
        layout = CheckpointLayout(Path(path), source.files, source.key_prefix, cfg.config_layout,
                                  bool(cfg.text.tie_word_embeddings), source.stored_dtypes(),
                                  source.ignored)
    for key in source.names():
        counts[module_of(key)] += math.prod(source.shape(key))
    check_finite(source)
    text = cfg.text
    return {
        "folder": str(layout.folder),
        "config_layout": layout.config_layout,
        "weight_files": [f.name for f in layout.weight_files],
        "weight_dtypes": layout.weight_dtypes,
        "backbone_key_prefix": layout.key_prefix,
        "ignored_keys": len(layout.ignored_keys),
        "tied_lm_head": layout.tied_lm_head,
        "compressor_type": cfg.compressor_type.value if cfg.compressor_type else None,
        "adapter": str(layout.adapter) if layout.adapter else None,
        "adapters": [str(a) for a in layout.adapters],
        "dims": {"vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
                 "intermediate_size": text.intermediate_size, "layers": text.num_hidden_layers,
                 "attention_heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                 "head_dim": text.head_dim, "linear_key_heads": text.linear_num_key_heads,
                 "linear_value_heads": text.linear_num_value_heads,
                 "conv_kernel": text.linear_conv_kernel_dim},
        "layer_types": dict(Counter(text.layer_types)),
        "layer_pattern": "".join("F" if t == "full_attention" else "L" for t in text.layer_types),
        "parameters": dict(sorted(counts.items())),
        "parameters_total": sum(counts.values()),
        "pad_token_id": cfg.pad_token_id,
        "eos_token_ids": cfg.eos_token_ids,
        "problems": problems,
    }


def run_inspect(args: InspectArgs) -> int:
    report = inspect_report(args.checkpoint, args.base, args.adapters)
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if report["problems"] else 0
    print(f"PIPO checkpoint {report['folder']}")
    print(f"  config layout   {report['config_layout']}   weights {', '.join(report['weight_files'])} "
          f"({', '.join(report['weight_dtypes'])})")
    print(f"  backbone keys   {report['backbone_key_prefix']}*   ignored keys: {report['ignored_keys']}")
    print(f"  lm_head         {'tied to embed_tokens' if report['tied_lm_head'] else 'untied'}")
    print(f"  compressor      {report['compressor_type']}")
    if report["adapters"]:
        print(f"  adapters        {' + '.join(report['adapters'])} (merged in order)")
    print("  dims            " + ", ".join(f"{k}={v}" for k, v in report["dims"].items()))
    print(f"  layers          {report['layer_pattern']}  (L = linear_attention, F = full_attention)")
    print(f"  pad / eos       {report['pad_token_id']} / {report['eos_token_ids'] or 'none'}")
    print("  parameters")
    for name, n in report["parameters"].items():
        print(f"    {name:28s} {n:>14,d}")
    print(f"    {'total':28s} {report['parameters_total']:>14,d}")
    for p in report["problems"]:
        print(f"  problem: {p}")
    return 1 if report["problems"] else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_flags(p)
    p.add_argument("--json", action="store_true")


def command(ns: argparse.Namespace) -> int:
    return run_inspect(InspectArgs(checkpoint=ns.checkpoint, json=ns.json, base=ns.base,
                                   adapters=list(ns.adapters)))
