"""What each weight format does to a trained PIPO model: tokens, the gate and speed (issue 23).

    python -m benchmarks.quality tests/data/pipo-fixture --work build/quality \
        --json benchmarks/results/quality-fixture.json

On a checkpoint with its held-out text (the fixture: tests/data/pipo-fixture/heldout.txt), for
each row of ROWS: export it (one trace cache for all), score the text with `pipo-export eval`
against the float32 export's saved log-probabilities (eval --save-reference, once), and time
greedy free-running decoding at tau = 0.5 and tau = -1 (every token 2 kept) through
pipo_runtime, the rows interleaved round by round. Prints the markdown table of
benchmarks/README.md; --json keeps every figure. Run it alone on the machine: the ms/token
column is a timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipo_graphs.dtypes import DType

from benchmarks.peers.machine import machine_info

ROWS: dict[str, dict] = {  # label -> ExportOptions fields
    "float32": {},
    "float16": {"dtype": DType.FLOAT16},
    "int8 b32": {"weights": "int8"},
    "int4 b32 sym acc4": {"weights": "int4"},
    "int4 b32 asym acc4": {"weights": "int4", "symmetric": False},
    "int4 b128 sym acc4": {"weights": "int4", "block_size": 128},
    "int4 b128 asym acc4": {"weights": "int4", "block_size": 128, "symmetric": False},
    "int4 b32 sym acc0": {"weights": "int4", "accuracy_level": 0},
    "int4 b128 sym acc0": {"weights": "int4", "block_size": 128, "accuracy_level": 0},
    "int4 b32 sym acc4 + lm_head int8": {"weights": "int4", "head_weights": "int8"},
    "int4 b128 sym acc4 + lm_head int8": {"weights": "int4", "block_size": 128,
                                          "head_weights": "int8"},
}
TAU = 0.5


@dataclass
class QualityOptions:
    checkpoint: str
    work: str = "build/quality"
    text: str | None = None  # default: CHECKPOINT/heldout.txt
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    context: int = 512  # eval window
    prompt_tokens: int = 256  # timed generations: the text's first tokens as the prompt
    new_tokens: int = 64
    repeats: int = 5
    threads: int = 2
    scores_from: str | None = None  # a previous run's --json: reuse its eval reports (the
    # exports are deterministic; eval is the slow part), time again


def log(text: str) -> None:
    print(f"[quality] {text}", file=sys.stderr, flush=True)


def slug(label: str) -> str:
    return label.replace(" + ", "-").replace(" ", "-")


def export_rows(opts: QualityOptions) -> dict[str, Path]:
    """Each row's export under work/ (reused when its manifest is there)."""
    from pipo_export.export.options import ExportOptions
    from pipo_export.export.pipeline import export
    work, out = Path(opts.work), {}
    for label in opts.rows:
        folder = work / slug(label)
        if not (folder / "manifest.json").is_file():
            t = time.perf_counter()
            export(ExportOptions(checkpoint=opts.checkpoint, out=str(folder), force=True,
                                 trace_cache=str(work / "trace-cache"), **ROWS[label]))
            log(f"exported {label} in {time.perf_counter() - t:.1f}s")
        out[label] = folder
    return out


def score_rows(opts: QualityOptions, folders: dict[str, Path], text: str) -> dict[str, dict]:
    """eval of every row against the float32 row's saved reference."""
    from pipo_export.eval.run import EvalOptions, evaluate
    ref = Path(opts.work) / "float32.reference"
    evaluate(EvalOptions(export=str(folders["float32"]), text=text, context=opts.context,
                         threads=opts.threads, save_reference=str(ref), progress=False))
    out = {}
    for label, folder in folders.items():  # float32 against itself: KL 0, the table's anchor
        out[label] = evaluate(EvalOptions(export=str(folder), text=text, reference=str(ref),
                                          context=opts.context, threads=opts.threads,
                                          progress=False))
        log(f"scored {label}")
    return out


def time_rows(opts: QualityOptions, folders: dict[str, Path], text: str) -> dict[str, dict]:
    """Greedy decoding from the first prompt_tokens tokens of the file `text`, new_tokens tokens, at tau and
    at -1; medians over `repeats` rounds, the rows interleaved (one warm-up round first)."""
    from pipo_runtime import GenerationConfig, PipoSession
    sessions = {label: PipoSession.load(folder, threads=opts.threads)
                for label, folder in folders.items()}
    first = next(iter(sessions.values()))
    prompt = first.tokenizer.encode(Path(text).read_text(encoding="utf-8"),
                                    add_special_tokens=False).ids[:opts.prompt_tokens]
    prompt = prompt[:len(prompt) - len(prompt) % 2]
    runs = {label: {TAU: [], -1.0: []} for label in sessions}
    commits = {label: None for label in sessions}
    for r in range(opts.repeats + 1):
        for label, session in sessions.items():
            for tau in (TAU, -1.0):
                res = session.generate([prompt], GenerationConfig(
                    max_new_tokens=opts.new_tokens, threshold=tau, ignore_eos=True))
                if r:
                    runs[label][tau].append(res.ms_per_token)
                    if tau == TAU:
                        commits[label] = res.sequences[0].commit_rate
    return {label: {"ms_per_token": statistics.median(runs[label][TAU]),
                    "ms_per_token_tau_-1": statistics.median(runs[label][-1.0]),
                    "free_running_commit_rate": commits[label]} for label in sessions}


def markdown(rows: dict[str, dict]) -> str:
    head = ("| weights | ppl token 1 | ppl token 2 | KL mean (t1 / t2) | KL p99 (t1 / t2) | "
            "top-1 agree (t1 / t2) | commit @0.5 | tokens/step @0.5 | ms/token @0.5 | "
            "ms/token @-1 |")
    lines = [head, "|" + "---|" * 10]
    for label, r in rows.items():
        ref, gate = r["eval"]["reference"], r["eval"]["gate"]
        at = next(t for t in gate["taus"] if abs(t["tau"] - TAU) < 1e-9)
        kl = ref["kl"]
        lines.append(
            f"| {label} | {r['eval']['perplexity']['token1']:.3f} | "
            f"{r['eval']['perplexity']['token2']:.3f} | "
            f"{kl['token1']['mean']:.2e} / {kl['token2']['mean']:.2e} | "
            f"{kl['token1']['p99']:.2e} / {kl['token2']['p99']:.2e} | "
            f"{ref['top1_agreement']['token1']:.2%} / {ref['top1_agreement']['token2']:.2%} | "
            f"{at['commit_rate']:.1%} | {at['tokens_per_step']:.3f} | "
            f"{r['timing']['ms_per_token']:.2f} | {r['timing']['ms_per_token_tau_-1']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    d = QualityOptions(checkpoint="")
    ap.add_argument("--work", default=d.work)
    ap.add_argument("--text", default=None, help="default: CHECKPOINT/heldout.txt")
    ap.add_argument("--rows", default=",".join(d.rows), help="comma-separated labels of ROWS")
    ap.add_argument("--repeats", type=int, default=d.repeats)
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--json", default=None, metavar="F")
    ap.add_argument("--scores-from", default=None, metavar="F",
                    help="reuse the eval reports of a previous run's --json (same exports), "
                         "only time again")
    a = ap.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or "float32" not in rows:
        ap.error(f"--rows: unknown {unknown}; choose from {list(ROWS)} (float32 is the reference)"
                 if unknown else "--rows must include float32 (the reference)")
    opts = QualityOptions(checkpoint=a.checkpoint, work=a.work, text=a.text, rows=rows,
                          repeats=a.repeats, new_tokens=a.new_tokens, threads=a.threads,
                          scores_from=a.scores_from)
    text = opts.text or str(Path(opts.checkpoint) / "heldout.txt")
    t0 = time.perf_counter()
    folders = export_rows(opts)
    if opts.scores_from:
        previous = json.loads(Path(opts.scores_from).read_text())["rows"]
        missing = [label for label in folders if label not in previous]
        if missing:
            ap.error(f"--scores-from {opts.scores_from} has no rows {missing}")
        scores = {label: previous[label]["eval"] for label in folders}
    else:
        scores = score_rows(opts, folders, text)
    timing = time_rows(opts, folders, text)
    rows_out = {label: {"export": ROWS[label], "eval": scores[label], "timing": timing[label],
                        "weights_bytes": (folders[label] / "weights.data").stat().st_size}
                for label in folders}
    report = {"checkpoint": opts.checkpoint, "text": text, "machine": machine_info(),
              "settings": {k: v for k, v in vars(opts).items()}, "rows": rows_out,
              "seconds": time.perf_counter() - t0}
    print(markdown(rows_out))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
