"""`pipo-export bench`: PIPO against regular decoding and transformers eager, in one process.

For one model shape: write a random-weight checkpoint, export it twice (PIPO and `--mode
regular`, reused from the work folder when present), then for each context length run, interleaved
and repeated: PIPO with tau < 0 (every token2 kept), PIPO at a threshold (its commit rate is
reported), regular decoding (both through pipo_runtime on ONNX Runtime CPU), and transformers'
eager `generate` on the same backbone. Reports medians and min-max, memory, sizes, bytes per step
and achieved bandwidth against the machine's measured copy bandwidth.
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import MANIFEST, load_manifest
from pipo_runtime import PipoSession

from pipo_export.bench import folder_bytes
from pipo_export.bench.options import BenchOptions
from pipo_export.bench.measure import (Latency, cache_bytes, decode_bytes, memory_bandwidth_gbs, run_hf,
                            run_session)

METHODS = ("pipo", "pipo_gated", "regular", "hf_eager")


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def write_checkpoint(shape: str, layers: int | None, workdir: str, seed: int = 0,
                     rebuild: bool = False, max_positions: int = 32768) -> tuple[Path, Path]:
    """The bench's random checkpoint under workdir (reused unless rebuild); -> (root, folder).
    Published shapes (pipo_export.model.shapes): their real text dims in the released layout
    (multimodal wrapper, model.language_model.* keys, bf16 shards, vision tower, Qwen's MTP),
    written tensor by tensor; tiny/small: write_tiny_checkpoint with max_position_embeddings
    >= max_positions so the exports serve later runs with other contexts."""
    from pipo_export.model import shapes
    from pipo_export.model.synthetic import SHAPES, with_layers, write_tiny_checkpoint

    if shape not in SHAPES and shape not in shapes.SHAPES:
        raise PipoUserError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    config = with_layers(SHAPES[shape] if shape in SHAPES else shapes.pipo_text_config(shape),
                         layers, max_positions)  # PipoError on a bad --layers
    root = Path(workdir) / f"{shape}-L{config['num_hidden_layers']}"
    ckpt = root / "checkpoint"
    if rebuild or not (ckpt / "config.json").is_file():
        log(f"writing {shape} checkpoint ({config['num_hidden_layers']} layers) to {ckpt}")
        shutil.rmtree(ckpt, ignore_errors=True)
        if shape in shapes.SHAPES:
            shapes.write_shape_checkpoint(ckpt, shape, layers=layers, seed=seed)
        else:
            write_tiny_checkpoint(ckpt, seed=seed, text_config=config)
    return root, ckpt


def prepare(opts: BenchOptions) -> tuple[Path, Path, Path]:
    """Checkpoint + PIPO export + regular export under workdir (reused unless --rebuild)."""
    from pipo_export.export.pipeline import export
    from pipo_export.export.options import ExportOptions
    from pipo_graphs.contract import Mode

    root, ckpt = write_checkpoint(opts.shape, opts.layers, opts.workdir, opts.seed, opts.rebuild,
                                  max(max(opts.contexts) + 2 * opts.new_tokens + 2, 32768))
    outs = {}
    for mode in (Mode.PIPO, Mode.REGULAR):
        out = root / mode.value
        outs[mode] = out
        if not opts.rebuild and (out / MANIFEST).is_file():
            log(f"reusing {out} (--rebuild to export again)")
            continue
        log(f"exporting {mode.value} to {out}")
        export(ExportOptions(checkpoint=str(ckpt), out=str(out), mode=mode, force=True))
    return ckpt, outs[Mode.PIPO], outs[Mode.REGULAR]


def bench_contexts(model, pipo_dir: Path, regular_dir: Path, opts: BenchOptions) -> dict:
    """Interleaved, repeated latency runs at every context; -> {context: {method: summary}}."""
    from pipo_export.bench.hf_baseline import hf_causal_lm

    sessions = {"pipo": PipoSession.load(pipo_dir, threads=opts.threads),
                "regular": PipoSession.load(regular_dir, threads=opts.threads)}
    hf = hf_causal_lm(model)
    vocab = model.config.vocab_size
    manifests = {k: s.manifest for k, s in sessions.items()}
    results = {}
    for context in opts.contexts:
        prompt = np.random.default_rng(context).integers(0, vocab - 2, context).tolist()
        lat = {m: Latency() for m in METHODS}
        runs = {"pipo": lambda into: run_session(sessions["pipo"], prompt, opts.new_tokens, -1.0,
                                                 into),
                "pipo_gated": lambda into: run_session(sessions["pipo"], prompt, opts.new_tokens,
                                                       opts.threshold, into),
                "regular": lambda into: run_session(sessions["regular"], prompt, opts.new_tokens,
                                                    -1.0, into),
                "hf_eager": lambda into: run_hf(hf, prompt, opts.new_tokens, into)}
        for r in range(opts.repeats + 1):  # round 0 warms up and is dropped
            for method, run in runs.items():
                log(f"context {context}: {method} (round {r}/{opts.repeats})")
                run(lat[method] if r else Latency())
        row = {m: lat[m].summary() for m in METHODS}
        slots = {"pipo": context // 2 + opts.new_tokens // 2, "regular": context + opts.new_tokens}
        row["bytes_per_step"] = {
            "pipo": decode_bytes(model, manifests["pipo"], slots["pipo"]),
            "regular": decode_bytes(model, manifests["regular"], slots["regular"])}
        row["cache_bytes"] = {k: cache_bytes(manifests[k], slots[k]) for k in slots}
        row["achieved_gbs"] = {
            k: row["bytes_per_step"][k]["total"] / (row[m]["ms_per_step"]["median"] * 1e-3) / 1e9
            for k, m in (("pipo", "pipo"), ("regular", "regular"))}
        results[str(context)] = row
    for s in sessions.values():
        s.close()
    return results


def ratios(row: dict) -> dict:
    med = {m: {k: row[m][k]["median"] for k in ("ttft_ms", "tpot_ms")} for m in METHODS}
    return {"ttft_regular_over_pipo": med["regular"]["ttft_ms"] / med["pipo"]["ttft_ms"],
            "tpot_regular_over_pipo": med["regular"]["tpot_ms"] / med["pipo"]["tpot_ms"],
            "tpot_regular_over_pipo_gated": med["regular"]["tpot_ms"] / med["pipo_gated"]["tpot_ms"],
            "ttft_hf_over_pipo": med["hf_eager"]["ttft_ms"] / med["pipo"]["ttft_ms"],
            "tpot_hf_over_pipo": med["hf_eager"]["tpot_ms"] / med["pipo"]["tpot_ms"]}


def markdown(report: dict) -> str:
    bw = report["machine"]["copy_bandwidth_gbs"]
    lines = [f"### {report['shape']} ({report['layers']} layers, {report['parameters']:,} "
             f"parameters), {report['new_tokens']} new tokens, batch 1, ONNX Runtime CPU "
             f"{report['machine']['threads']} threads; copy bandwidth {bw:.1f} GB/s", "",
             "| context | method | TTFT ms (min-max) | ms/token (min-max) | commit | "
             "bytes/step | GB/s (of copy bw) |", "|---|---|---|---|---|---|---|"]
    for context, row in report["contexts"].items():
        for m in METHODS:
            s = row[m]
            key = {"pipo": "pipo", "pipo_gated": "pipo", "regular": "regular"}.get(m)
            moved = f"{row['bytes_per_step'][key]['total'] / 1e6:.1f} MB" if key else "-"
            gbs = (row["bytes_per_step"][key]["total"] / (s["ms_per_step"]["median"] * 1e-3)
                   / 1e9 if key else None)
            rate = "-" if s["commit_rate"] is None else f"{s['commit_rate']:.2f}"
            lines.append(
                f"| {context} | {m} | {s['ttft_ms']['median']:.1f} ({s['ttft_ms']['min']:.1f}-"
                f"{s['ttft_ms']['max']:.1f}) | {s['tpot_ms']['median']:.2f} "
                f"({s['tpot_ms']['min']:.2f}-{s['tpot_ms']['max']:.2f}) | {rate} | {moved} | "
                + (f"{gbs:.1f} ({gbs / bw:.0%})" if gbs else "-") + " |")
    lines.append("")
    for context, r in report["ratios"].items():
        lines.append(f"- context {context}: regular/PIPO TTFT {r['ttft_regular_over_pipo']:.2f}x, "
                     f"per token {r['tpot_regular_over_pipo']:.2f}x (gated "
                     f"{r['tpot_regular_over_pipo_gated']:.2f}x); HF eager/PIPO TTFT "
                     f"{r['ttft_hf_over_pipo']:.2f}x, per token {r['tpot_hf_over_pipo']:.2f}x")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipoUserError("--plot needs matplotlib: pip install matplotlib "
                            "(or pip install 'pipo-export[bench]')") from None
    return plt


def plot(reports: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for report in reports:
        ctx = [int(c) for c in report["contexts"]]
        for m in METHODS:
            for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
                ax.plot(ctx, [report["contexts"][str(c)][m][key]["median"] for c in ctx],
                        marker="o", label=f"{report['shape']} {m}")
    for ax, title in zip(axes, ("time to first token (ms)", "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_bench(opts: BenchOptions) -> int:
    from pipo_export.model.checkpoint import load_checkpoint

    if min(opts.contexts) < 1 or opts.new_tokens < 2 or opts.repeats < 1:
        raise PipoUserError("--contexts must be >= 1, --new-tokens >= 2, --repeats >= 1")
    if opts.plot_file:
        _pyplot()  # fail before the long work, not after
    t0 = time.perf_counter()
    ckpt, pipo_dir, regular_dir = prepare(opts)
    model = load_checkpoint(ckpt)
    log("measuring memory bandwidth (numpy copy of 512 MiB)")
    manifests = {"pipo": load_manifest(pipo_dir), "regular": load_manifest(regular_dir)}
    import torch
    report = {"shape": opts.shape, "layers": model.config.text.num_hidden_layers,
              "parameters": sum(p.numel() for p in model.parameters()),
              "new_tokens": opts.new_tokens, "repeats": opts.repeats,
              "threshold": opts.threshold,
              "machine": {"copy_bandwidth_gbs": memory_bandwidth_gbs(),
                          "threads": opts.threads or torch.get_num_threads()},
              "exports": {k: {"export_s": m.export.timings["total_s"],
                              "bytes": folder_bytes(d), "folder": str(d)}
                          for (k, m), d in zip(manifests.items(), (pipo_dir, regular_dir))}}
    report["contexts"] = bench_contexts(model, pipo_dir, regular_dir, opts)
    report["ratios"] = {c: ratios(row) for c, row in report["contexts"].items()}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["wall_s"] = time.perf_counter() - t0
    print(markdown(report))
    print(f"\nprocess peak RSS {report['peak_rss_mb']:.0f} MB (all methods, one process); "
          f"exports: PIPO {report['exports']['pipo']['bytes'] / 1e6:.1f} MB in "
          f"{report['exports']['pipo']['export_s']:.0f} s, regular "
          f"{report['exports']['regular']['bytes'] / 1e6:.1f} MB in "
          f"{report['exports']['regular']['export_s']:.0f} s; bench {report['wall_s']:.0f} s")
    if opts.json_file:
        Path(opts.json_file).write_text(json.dumps(report, indent=2))
        log(f"wrote {opts.json_file}")
    if opts.plot_file:
        plot([report], opts.plot_file)
        log(f"wrote {opts.plot_file}")
    return 0
