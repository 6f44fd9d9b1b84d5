"""`pipo-export merge ADAPTER --base BASE -o OUT` (or `--base BASE --adapter A --adapter B`):
PEFT LoRA adapters merged, in order, into their Qwen3.5 base, written as a PIPO checkpoint
folder (base layout and dtypes kept, PIPO fields added)."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.model.adapters import write_merged

    stack = [ns.adapter] * bool(ns.adapter) + list(getattr(ns, "adapters", []))
    files = write_merged(stack, ns.base, ns.out, dtype=getattr(ns, "dtype", None),
                         force=ns.force)
    print(f"merged {' + '.join(stack)} into {ns.base}: wrote {ns.out} ({len(files)} weight "
          f"file{'s' if len(files) > 1 else ''})")
    return 0
