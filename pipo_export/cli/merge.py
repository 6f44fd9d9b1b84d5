"""`pipo-export merge ADAPTER --base BASE -o OUT`: a PEFT LoRA adapter merged into its Qwen3.5
base, written as a PIPO checkpoint folder (base layout and dtypes kept, PIPO fields added)."""
from __future__ import annotations


def command(ns) -> int:
    from pipo_export.model.adapters import write_merged

    files = write_merged(ns.adapter, ns.base, ns.out, dtype=getattr(ns, "dtype", None),
                         force=ns.force)
    print(f"merged {ns.adapter} into {ns.base}: wrote {ns.out} ({len(files)} weight "
          f"file{'s' if len(files) > 1 else ''})")
    return 0
