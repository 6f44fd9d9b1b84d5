"""`pipo-export merge ADAPTER --base BASE -o OUT` (or `--base BASE --adapter A --adapter B`):
PEFT LoRA adapters merged, in order, into their Qwen3.5 base, written as a PIPO checkpoint
folder (base layout and dtypes kept, PIPO fields added)."""
from __future__ import annotations

import argparse

from pipo_export.cli.flags import DTYPES, add_source_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_flags(p, "adapter", help="PEFT adapter folder (adapter_config.json + "
                                        "adapter_model.safetensors)",
                     base_help="the Qwen3.5 base folder the adapter was trained on")
    p.add_argument("-o", "--out", required=True, help="merged checkpoint folder to write")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: each tensor keeps the base's dtype")
    p.add_argument("--force", action="store_true", help="replace an existing folder")


def command(ns: argparse.Namespace) -> int:
    from pipo_export.model.adapters import write_merged

    stack = [ns.adapter] * bool(ns.adapter) + list(getattr(ns, "adapters", []))
    files = write_merged(stack, ns.base, ns.out, dtype=getattr(ns, "dtype", None),
                         force=ns.force)
    print(f"merged {' + '.join(stack)} into {ns.base}: wrote {ns.out} ({len(files)} weight "
          f"file{'s' if len(files) > 1 else ''})")
    return 0
