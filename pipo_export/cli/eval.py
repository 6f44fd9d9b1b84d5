"""`pipo-export eval OUT --text FILE`: perplexity, KL against a reference and the gate of an
export, teacher forced through its own graphs (pipo_export.eval). No torch unless the reference
is a checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipo_export.eval.run import EvalOptions

DEFAULTS = EvalOptions(export="", text="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="export folder to evaluate (needs its tokenizer.json)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text scored teacher forced")
    p.add_argument("--reference", default=None, metavar="OUT_OR_CHECKPOINT",
                   help="compare against another export, a checkpoint (torch float32) or a file "
                        "written by --save-reference: KL, top-1 agreement, its gate")
    p.add_argument("--save-reference", default=None, metavar="F",
                   help="write this export's log-probabilities and confidences to F, for later "
                        "runs' --reference F (as llama.cpp's --kl-divergence-base)")
    p.add_argument("--context", type=int, default=DEFAULTS.context,
                   help=f"tokens per scored window (default {DEFAULTS.context})")
    p.add_argument("--batch", type=int, default=DEFAULTS.batch,
                   help=f"windows scored at once (default {DEFAULTS.batch})")
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--json", dest="json_file", default=None, metavar="F",
                   help="also write the report as JSON to F ('-' prints it instead of the table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def command(args: argparse.Namespace) -> int:
    from pipo_export.eval.run import evaluate, format_report
    report = evaluate(EvalOptions(export=args.out, text=args.text, reference=args.reference,
                                  save_reference=args.save_reference, context=args.context,
                                  batch=args.batch, threads=args.threads,
                                  progress=not args.no_progress))
    if args.json_file == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_report(report))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2) + "\n")
    return 0
