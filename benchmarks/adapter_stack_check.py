"""A stacked-adapter release at a real shape: every merged tensor against an independent merge.

    python -c "from pipo_export.model.shapes import write_adapter_stack; \
        write_adapter_stack('build/rel-4b', 'qwen3.5-4b')"
    python benchmarks/adapter_stack_check.py build/rel-4b/base build/rel-4b/adapter \
        build/rel-4b/adapter-2

The expected tensors are computed here from the raw safetensors files with peft's semantics for
a two-stage release (the OPD adapter trained over the SFT-merged model, saved in the base dtype):
  stage k: W_k = cast_base_dtype(W_{k-1}) as float32 + (alpha / r) * B_k @ A_k  (merge_and_unload)
  modules_to_save: the last adapter that saves a tensor replaces it.
and compared with pipo-export's merged TensorSource (what `export --base --adapter --adapter`
streams into weights.data), which must equal it exactly (same float32 sums, same casts). The
tiny shape's test compares against peft itself (tests/model/test_adapters*.py); peft cannot load
a random 4B release in 24 GB with its model around it, so this check replaces it at real shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

PEFT_PREFIX = "base_model.model."


def adapter_parts(folder: Path) -> tuple[dict, dict, float]:
    """-> ({module: (A, B)}, {saved tensor key: tensor}, scaling) of one PEFT adapter folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    loras, saved = {}, {}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            name = key[len(PEFT_PREFIX):]
            if ".lora_A." in name or ".lora_B." in name:
                module, part = name.rsplit(".lora_", 1)
                loras.setdefault(module, {})[part[0]] = f.get_tensor(key)
            else:
                saved[name] = f.get_tensor(key)
    return {m: (p["A"], p["B"]) for m, p in loras.items()}, saved, scaling


def base_tensors(base: Path) -> dict[str, tuple[Path, str]]:
    """checkpoint key -> (shard, key) from the base's safetensors index."""
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: (base / shard, k) for k, shard in index.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("adapters", nargs="+", help="in merge order (SFT, then OPD)")
    a = ap.parse_args(argv)
    from pipo_export.model.adapters import open_adapter
    from pipo_export.model.source import normalize_key
    t0 = time.perf_counter()
    base, folders = Path(a.base), [Path(x) for x in a.adapters]
    _, merged = open_adapter([str(f) for f in folders], str(base))
    stages = [adapter_parts(f) for f in folders]
    raw = base_tensors(base)
    by_name = {normalize_key(k)[0]: k for k in raw if normalize_key(k)[0]}
    checked = {"lora": 0, "saved": 0, "untouched": 0}
    worst = 0.0
    saved_names = {}
    for _, saved, _ in stages:
        saved_names.update(saved)  # the last adapter wins
    replaced = {normalize_key(k)[0] or k for k in saved_names}
    for name, key in sorted(by_name.items()):
        if name in replaced:
            continue
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        hits = [i for i, (loras, _, _) in enumerate(stages) if module in loras]
        shard, k = raw[key]
        with safe_open(str(shard), "pt") as f:
            w = f.get_tensor(k)
        dtype = w.dtype
        want = w
        for i, (loras, _, scaling) in enumerate(stages):
            if i in hits:
                A, B = loras[module]
                if i > 0 and hits[0] < i:
                    want = want.to(dtype)  # the earlier merge, saved in the base dtype
                want = want.float() + (B.float() @ A.float()) * scaling
        got = merged.get(name)
        if hits:
            checked["lora"] += 1
        else:
            checked["untouched"] += 1
        if got.shape != want.shape or not torch.equal(got.float(), want.float()):
            diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape \
                else float("inf")
            worst = max(worst, diff)
            print(f"MISMATCH {name}: max |diff| {diff:.3g}", file=sys.stderr)
    for key, tensor in saved_names.items():
        name = normalize_key(key)[0] or key
        if not torch.equal(merged.get(name).float(), tensor.float()):
            worst = float("inf")
            print(f"MISMATCH saved {name}", file=sys.stderr)
        checked["saved"] += 1
    print(json.dumps({"checked": checked, "equal": worst == 0.0,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
