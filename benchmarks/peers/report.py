"""The peer bench's report: one JSON document, its markdown table, the bytes-moved bound of
PIPO over regular decoding per precision, the issue's targets as ratios, and a plot."""
from __future__ import annotations

import statistics

from benchmarks.peers import BUSY_CORES


def stat(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "samples": [round(x, 4) for x in xs]}


def semantics() -> dict:
    from benchmarks.peers import llamacpp, ortgenai, ours
    return {"pipo-export": ours.SEMANTICS, "onnxruntime-genai": ortgenai.SEMANTICS,
            "llama.cpp": llamacpp.SEMANTICS,
            "cpu_others": f"cores other processes used during a measurement (/proc/stat busy "
                          f"time minus the measuring processes' own); >= {BUSY_CORES} flags it"}


def bound_rows(bounds: dict, results: dict) -> dict:
    """{context: {precision: ...}}: bytes a decode step reads (PIPO per step and per token at
    tau < 0, regular per token), their ratio (the bound on regular/PIPO time per token) and the
    measured ratio of medians."""
    out: dict = {}
    for context, per_precision in bounds.items():
        for precision, parts in per_precision.items():
            if set(parts) != {"pipo", "regular"}:
                continue
            pipo_step, regular = parts["pipo"]["total"], parts["regular"]["total"]
            row = {"pipo_step_bytes": pipo_step, "pipo_token_bytes": pipo_step / 2,
                   "regular_token_bytes": regular, "bound": regular / (pipo_step / 2),
                   "parts": parts}
            got = results.get(context, {})
            keys = (f"pipo-{precision}", f"regular-{precision}")
            if all(k in got for k in keys):
                row["measured"] = (got[keys[1]]["ms_per_token"]["median"]
                                   / got[keys[0]]["ms_per_token"]["median"])
                row["of_bound"] = row["measured"] / row["bound"]
            out.setdefault(context, {})[precision] = row
    return out


def targets(results: dict) -> dict:
    """The issue's criteria as ratios of medians, where both sides were measured."""
    out: dict = {}
    for context, got in results.items():
        med = {k: {m: v[m]["median"] for m in ("ttft_ms", "ms_per_token")}
               for k, v in got.items()}
        row = {}
        for peer in ("llamacpp-Q4_K_M", "ortgenai-int4"):
            if "pipo-int4" in med and peer in med:
                row[f"pipo_int4_over_{peer}_per_token"] = (med["pipo-int4"]["ms_per_token"]
                                                           / med[peer]["ms_per_token"])
        for key in med:
            if key.startswith("pipo-") and f"regular-{key[5:]}" in med:
                row[f"regular_over_pipo_ttft_{key[5:]}"] = (med[f"regular-{key[5:]}"]["ttft_ms"]
                                                            / med[key]["ttft_ms"])
        if med:
            row["lowest_ttft"] = min(med, key=lambda k: med[k]["ttft_ms"])
        out[context] = row
    return out


def build(opts, text: dict, methods, results: dict, bounds: dict, skipped: list[dict],
          peers_info: dict, machine: dict) -> dict:
    """The JSON document of one `python -m benchmarks.peers` run."""
    rows: dict = {}
    by_key = {m.key: m for m in methods}
    for context, per_method in results.items():
        rows[context] = {}
        for key, samples in per_method.items():
            m = by_key[key]
            rows[context][key] = {
                "tool": m.tool, "precision": m.precision,
                "ttft_ms": stat([s.ttft_ms for s in samples]),
                "ms_per_token": stat([s.ms_per_token for s in samples]),
                "cpu_others": [s.cpu_others for s in samples],
                "cpu_busy_before": [s.cpu_busy_before for s in samples],
                "flagged": any(s.flagged for s in samples),
                "details": [s.extra for s in samples]}
    return {
        "shape": opts.shape, "layers": text["num_hidden_layers"],
        "full_layers": _full_layers(opts.shape), "new_tokens": opts.new_tokens,
        "repeats": opts.repeats, "threads": opts.threads, "contexts": opts.contexts,
        "block_size": opts.block_size, "machine": machine,
        "methods": [{"key": m.key, "tool": m.tool, "precision": m.precision,
                     "artifact": m.artifact, "bytes": m.bytes, **m.info} for m in methods],
        "peers": peers_info, "skipped": skipped, "semantics": semantics(),
        "results": rows, "bytes_bound": bound_rows(bounds, rows), "targets": targets(rows),
        "gated": gated_rows(rows, opts.gated_commit_rate)}


def gated_rows(rows: dict, commit: float | None) -> dict:
    """PIPO's gated operating point per context and precision: at tau < 0 every decode step
    emits two tokens, so step = 2 x ms/token; a gate that keeps token 2 in a fraction `commit`
    of steps emits 1 + commit per step of the same graph -> ms/token = step / (1 + commit).
    Derived from the measured medians, not timed."""
    if commit is None:
        return {}
    out: dict = {}
    for context, per_method in rows.items():
        for key, r in per_method.items():
            if key.startswith("pipo-"):
                step = 2 * r["ms_per_token"]["median"]
                out.setdefault(context, {})[key] = {
                    "commit_rate": commit, "ms_per_step": step,
                    "ms_per_token": step / (1 + commit)}
    return out


def _full_layers(shape: str) -> int | None:
    from pipo_export.model.shapes import SHAPES
    return SHAPES[shape].text_config["num_hidden_layers"] if shape in SHAPES else None


def _mm(s: dict, digits: int) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"


def markdown(doc: dict) -> str:
    """Tables and notes, as printed by the bench."""
    depth = (f"{doc['layers']} of {doc['full_layers']} layers" if doc["full_layers"] else
             f"{doc['layers']} layers")
    lines = [f"### {doc['shape']} ({depth}), {doc['new_tokens']} new tokens, batch 1, "
             f"{doc['threads']} threads per tool; medians of {doc['repeats']} interleaved "
             "rounds (min-max)", "",
             "| context | tool | precision | TTFT ms | ms/token | size MB | others' CPU |",
             "|---|---|---|---|---|---|---|"]
    sizes = {m["key"]: m["bytes"] for m in doc["methods"]}
    for context, per_method in doc["results"].items():
        for key, r in per_method.items():
            load = max(r["cpu_others"])
            lines.append(f"| {context} | {r['tool']} | {r['precision']} | {_mm(r['ttft_ms'], 1)} "
                         f"| {_mm(r['ms_per_token'], 2)} | {sizes[key] / 1e6:,.0f} | {load:.2f}"
                         + (" FLAGGED |" if r["flagged"] else " |"))
    if doc["bytes_bound"]:
        lines += ["", "Bytes a decode step reads (weights at their stored width, lm_head once per "
                  "sampled token, caches at the last step) and PIPO's bound over regular "
                  "decoding per token:", "",
                  "| context | precision | PIPO MB/step | PIPO MB/token | regular MB/token | "
                  "bound | measured | of bound |", "|---|---|---|---|---|---|---|---|"]
        for context, per_precision in doc["bytes_bound"].items():
            for precision, b in per_precision.items():
                got = (f"{b['measured']:.2f}x | {b['of_bound']:.0%}" if "measured" in b
                       else "- | -")
                lines.append(f"| {context} | {precision} | {b['pipo_step_bytes'] / 1e6:,.1f} | "
                             f"{b['pipo_token_bytes'] / 1e6:,.1f} | "
                             f"{b['regular_token_bytes'] / 1e6:,.1f} | {b['bound']:.2f}x | {got} |")
    gated = doc.get("gated") or {}
    if gated:
        lines += ["", "PIPO's gated operating point (derived: step / (1 + commit rate), the trained "
                  "gate's commit rate at tau 0.5 from the quality table):", "",
                  "| context | export | commit rate | ms/step | ms/token gated | ms/token tau -1 |",
                  "|---|---|---|---|---|---|"]
        for context, per_key in gated.items():
            for key, g in per_key.items():
                lines.append(f"| {context} | {key} | {g['commit_rate']:.1%} | "
                             f"{g['ms_per_step']:.2f} | {g['ms_per_token']:.2f} | "
                             f"{g['ms_per_step'] / 2:.2f} |")
    lines += [""] + [_target_line(c, t) for c, t in doc["targets"].items() if t]
    lines += ["", "What the numbers mean:"] + [f"- {v}" for v in doc["semantics"].values()]
    flagged = [(c, k) for c, pm in doc["results"].items() for k, r in pm.items() if r["flagged"]]
    if flagged:
        lines.append(f"- FLAGGED: measured while other processes used >= {BUSY_CORES} cores "
                     "(after waiting and retrying); do not read these as results: "
                     + ", ".join(f"{k} at {c}" for c, k in flagged))
    if doc["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['what']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines)


def _target_line(context: str, t: dict) -> str:
    parts = [f"lowest TTFT: {t['lowest_ttft']}"] if "lowest_ttft" in t else []
    parts += [f"{k.replace('_', ' ')} {v:.2f}x" for k, v in t.items() if k != "lowest_ttft"]
    return f"- context {context}: " + "; ".join(parts)


def plot(doc: dict, path: str) -> None:
    """TTFT and ms/token against context, one line per tool and precision (min-max bars)."""
    from pipo_export.bench.run import _pyplot
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    contexts = list(doc["results"])
    keys = list(dict.fromkeys(k for c in contexts for k in doc["results"][c]))
    for key in keys:
        have = [c for c in contexts if key in doc["results"][c]]
        first = doc["results"][have[0]][key]
        for ax, metric in zip(axes, ("ttft_ms", "ms_per_token")):
            vals = [doc["results"][c][key][metric] for c in have]
            med = [v["median"] for v in vals]
            err = [[m - v["min"] for m, v in zip(med, vals)],
                   [v["max"] - m for m, v in zip(med, vals)]]
            ax.errorbar([int(c) for c in have], med, yerr=err, marker="o", capsize=3,
                        label=f"{first['tool']} {first['precision']}")
    for ax, title in zip(axes, ("time to first token (ms)", "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{doc['shape']}, {doc['layers']} layers, {doc['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
