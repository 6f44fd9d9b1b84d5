"""`pipo-export inspect CKPT`: what the loader finds in a checkpoint folder."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from pipo_export.model.checkpoint import inspect_checkpoint
from pipo_export.errors import PipoError


@dataclass
class InspectArgs:
    checkpoint: str
    json: bool = False


def module_of(key: str) -> str:
    """Group a parameter key by top-level PIPO module (backbone split into its parts)."""
    if key.startswith("model.layers."):
        return "backbone.layers"
    if key.startswith("model."):
        return "backbone." + key.split(".")[1]
    return key.split(".")[0]


def inspect_report(path: str) -> dict:
    cfg, layout, tensors = inspect_checkpoint(path)
    counts: Counter = Counter()
    for key, t in tensors.items():
        counts[module_of(key)] += t.numel()
    text = cfg.text
    problems = []
    try:  # building the model surfaces shape and unused-key problems
        from pipo_export.model.checkpoint import load_checkpoint
        load_checkpoint(path)
    except PipoError as exc:
        problems.append(str(exc))
    return {
        "folder": str(layout.folder),
        "config_layout": layout.config_layout,
        "weight_files": [f.name for f in layout.weight_files],
        "weight_dtypes": layout.weight_dtypes,
        "backbone_key_prefix": layout.key_prefix,
        "ignored_keys": len(layout.ignored_keys),
        "tied_lm_head": layout.tied_lm_head,
        "compressor_type": cfg.compressor_type.value,
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
    report = inspect_report(args.checkpoint)
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if report["problems"] else 0
    print(f"PIPO checkpoint {report['folder']}")
    print(f"  config layout   {report['config_layout']}   weights {', '.join(report['weight_files'])} "
          f"({', '.join(report['weight_dtypes'])})")
    print(f"  backbone keys   {report['backbone_key_prefix']}*   ignored keys: {report['ignored_keys']}")
    print(f"  lm_head         {'tied to embed_tokens' if report['tied_lm_head'] else 'untied'}")
    print(f"  compressor      {report['compressor_type']}")
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


def command(ns) -> int:
    return run_inspect(InspectArgs(checkpoint=ns.checkpoint, json=ns.json))
