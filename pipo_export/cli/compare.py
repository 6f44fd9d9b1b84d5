"""`pipo-export compare SOURCE [--backends torch,onnxruntime,onnx-reference]`: the same prompts
and random numbers through every backend, compared step by step with Polygraphy's Comparator.
By default, every backend that can run the export in hand (default_backends)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipo_graphs import SamplingParams, step_uniforms
from pipo_graphs.contract import ATTENTION_MASK, CONFIDENCE, OUTPUT_MASK, PAIR, POSITION, PRESENT, \
    PROMPT_MASK, TARGET_CAPS
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import MANIFEST, Manifest, load_manifest
from pipo_graphs.tolerance import scale_of
from pipo_runtime.backends import Backend, parse_backend
from pipo_runtime.requests import check_request, prefill_feeds
from pipo_runtime.session import PipoSession

from pipo_export.cli.flags import add_sampling_flags, ids, sampling_from

# outputs that must match exactly: the pair and the bookkeeping states (masks, position)
EXACT = (PAIR, *(PRESENT + name for name in (ATTENTION_MASK, POSITION, PROMPT_MASK,
                                              OUTPUT_MASK)))
DEFAULT_PROMPTS = ([5, 17, 300], list(range(40, 51)), list(range(7, 140)))


@dataclass
class CompareArgs:
    source: str
    backends: list[Backend] | None = None  # None: default_backends of the export
    steps: int = 8
    threshold: float = 0.5
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5))
    seed: int = 0
    atol: float = 1e-3
    rtol: float = 1e-3
    prompts: list[list[int]] = field(default_factory=list)
    json: bool = False
    verbose: bool = False


def record(session: PipoSession, prompts, args: CompareArgs) -> list[dict]:
    """Run `steps` steps free-running; every step's outputs as numpy."""
    check_request(session.facts, prompts, args.steps)
    seqs = list(range(len(prompts)))
    runner = session.runner
    runner.prefill(prefill_feeds(prompts, session.facts.pad_id, args.sampling, args.threshold,
                                 args.seed, seqs))
    steps = [runner.outputs()]
    for step in range(1, args.steps):
        runner.decode(step_uniforms(args.seed, seqs, step))
        steps.append(runner.outputs())
    return steps


def default_backends(manifest: Manifest, checkpoint: str | None = None) -> list[Backend]:
    """The backends that can run an export: torch when its source checkpoint (or `checkpoint`)
    is there, onnxruntime, and onnx-reference for a target whose graphs hold standard ops only
    (onnx's reference evaluator cannot run ONNX Runtime's contrib ops)."""
    source = checkpoint or manifest.export.source
    backends = [Backend.TORCH] if source and Path(source).is_dir() else []
    backends.append(Backend.ONNXRUNTIME)
    if TARGET_CAPS[manifest.export.target].standard_ops_only:
        backends.append(Backend.ONNX_REFERENCE)
    return backends


def chosen_backends(folder: Path, args: CompareArgs, checkpoint: str | None) -> list[Backend]:
    """--backends, or the defaults; checked before anything runs (one-line PipoUserError)."""
    manifest = load_manifest(folder)
    backends = args.backends or default_backends(manifest, checkpoint)
    if len(backends) < 2:
        raise PipoUserError("compare needs at least two backends, e.g. --backends torch,onnxruntime"
                            + ("" if args.backends else f" (only {backends[0].value} can run "
                               f"{folder}: torch needs its source checkpoint)"))
    if Backend.ONNX_REFERENCE in backends:
        from pipo_runtime.backends.onnx_reference import check_standard_ops
        check_standard_ops(folder, manifest)
    return backends


def compare(folder: Path, args: CompareArgs, checkpoint: str | None = None) -> dict:
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.INFO if args.verbose else G_LOGGER.CRITICAL
    backends = chosen_backends(folder, args, checkpoint)
    prompts = args.prompts or [list(p) for p in DEFAULT_PROMPTS]
    runs = {}
    pad = None
    for backend in backends:
        print(f"running {backend.value} ...", file=sys.stderr, flush=True)
        session = PipoSession.load(folder, backend=backend, checkpoint=checkpoint)
        runs[backend.value] = record(session, prompts, args)
        pad = session.facts.pad_id
        session.close()
    ref_name = backends[0].value
    atol = scaled_atol(runs[ref_name], args.atol)
    exact = {name: 0.0 for name in EXACT}
    compare_func = SimpleCompareFunc(atol={**atol, **exact}, rtol={"": args.rtol, **exact},
                                     check_shapes=True)
    report = {"reference": ref_name, "prompts": len(prompts), "steps": args.steps,
              "atol": args.atol, "rtol": args.rtol, "atol_per_output": atol, "backends": {}}
    for name, steps in runs.items():
        if name == ref_name:
            continue
        ref_steps = runs[ref_name]
        diverged = next((i for i, (a, b) in enumerate(zip(ref_steps, steps))
                         if not np.array_equal(a[PAIR], b[PAIR])), None)
        upto = len(steps) if diverged is None else diverged + 1
        results = RunResults()
        for run_name, data in ((ref_name, ref_steps[:upto]), (name, steps[:upto])):
            common = [{k: np.ascontiguousarray(v) for k, v in s.items()
                       if k in ref_steps[0] and k in steps[0]}
                      for s in data]
            results.append((run_name, [IterationResult(outputs=o, runner_name=run_name)
                                       for o in common]))
        with np.errstate(divide="ignore", invalid="ignore"):  # relative error of exact zeros
            accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)
        per_step = []
        iterations = accuracy[0][(ref_name, name)]  # one AccuracyResult per compare function
        for i, iteration in enumerate(iterations):
            conf = iteration[CONFIDENCE]
            states = [r for k, r in iteration.items() if k.startswith("present.")]
            per_step.append({
                "step": i, "tokens_agree": bool(np.array_equal(ref_steps[i][PAIR],
                                                               steps[i][PAIR])),
                "confidence_max_abs": float(conf.max_absdiff),
                "confidence_max_rel": float(conf.max_reldiff),
                "states_max_abs": float(max((float(r.max_absdiff) for r in states), default=0)),
                "passed": all(bool(r) for r in iteration.values())})
        report["backends"][name] = {
            "passed": all(s["passed"] for s in per_step) and diverged is None,
            "first_diverging_step": diverged,
            "steps": per_step,
            "commit_rate": _commit_rate(steps, pad), "reference_commit_rate":
                _commit_rate(ref_steps, pad)}
    report["passed"] = all(b["passed"] for b in report["backends"].values())
    return report


def scaled_atol(ref_steps: list[dict], atol: float) -> dict[str, float]:
    """Per-output absolute tolerance: atol x scale_of(the output over all reference steps), the
    rule export validation uses (pipo_graphs.tolerance)."""
    names = {n for outputs in ref_steps for n, v in outputs.items() if v.dtype.kind == "f"}
    return {"": atol, **{n: atol * scale_of(*(o[n] for o in ref_steps if n in o))
                         for n in sorted(names)}}


def _commit_rate(steps: list[dict], pad: int) -> float:
    kept = [s[PAIR][:, 1] != pad for s in steps]
    return float(np.mean(np.concatenate(kept))) if kept else 0.0


def print_report(report: dict) -> None:
    print(f"reference: {report['reference']} | {report['prompts']} prompts, {report['steps']} steps"
          f" | atol {report['atol']} x max(1, max|reference|) per output, rtol {report['rtol']}"
          " (tokens, masks, positions exact)")
    print(f"{'backend':15s} {'step':>4s} {'tokens':>7s} {'conf abs':>10s} {'conf rel':>10s} "
          f"{'states abs':>11s}  result")
    for name, b in report["backends"].items():
        for s in b["steps"]:
            print(f"{name:15s} {s['step']:4d} {'agree' if s['tokens_agree'] else 'DIFFER':>7s} "
                  f"{s['confidence_max_abs']:10.2e} {s['confidence_max_rel']:10.2e} "
                  f"{s['states_max_abs']:11.2e}  {'PASS' if s['passed'] else 'FAIL'}")
        div = b["first_diverging_step"]
        print(f"{name:15s} tokens {'agree on every step' if div is None else f'diverge at step {div}'}"
              f"; commit rate {b['commit_rate']:.2f} (reference {b['reference_commit_rate']:.2f})"
              f"; {'PASS' if b['passed'] else 'FAIL'}")
    print("compare PASSED" if report["passed"] else "compare FAILED")


def run_compare(args: CompareArgs) -> int:
    """SOURCE is an export folder, or a checkpoint that is exported to a temporary folder."""
    source = Path(args.source)
    if not source.is_dir():
        raise PipoUserError(f"{source}: no such folder (give an export or a checkpoint folder)")
    if args.backends is not None and len(args.backends) < 2:
        raise PipoUserError("compare needs at least two backends, e.g. --backends torch,onnxruntime")
    if (source / MANIFEST).is_file():
        report = compare(source, args)
    else:
        from pipo_export.export.pipeline import export
        from pipo_export.export.options import ExportOptions
        with tempfile.TemporaryDirectory(prefix="pipo-compare-") as tmp:
            print(f"{source} is a checkpoint: exporting it first", file=sys.stderr)
            export(ExportOptions(checkpoint=str(source), out=str(Path(tmp) / "export")))
            report = compare(Path(tmp) / "export", args, checkpoint=str(source))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["passed"] else 1


DEFAULTS = CompareArgs(source="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="export folder (or a checkpoint, exported to a temp folder)")
    p.add_argument("--backends", default=None,
                   help="comma-separated, the first is the reference (default: torch when the "
                        "source checkpoint is there, onnxruntime, and onnx-reference for a "
                        "standard-op --target tensorrt export)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--atol", type=float, default=DEFAULTS.atol)
    p.add_argument("--rtol", type=float, default=DEFAULTS.rtol)
    p.add_argument("--ids", type=ids, action="append", default=[],
                   help="prompt ids (repeat for a batch); default: three built-in prompts")
    add_sampling_flags(p, DEFAULTS.sampling)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true",
                   help="print Polygraphy's full error statistics")


def command(ns: argparse.Namespace) -> int:
    backends = None if ns.backends is None else \
        [parse_backend(b.strip()) for b in ns.backends.split(",") if b.strip()]
    return run_compare(CompareArgs(source=ns.source, backends=backends, steps=ns.steps,
                                   threshold=ns.threshold, sampling=sampling_from(ns), seed=ns.seed,
                                   atol=ns.atol, rtol=ns.rtol, prompts=ns.ids, json=ns.json,
                                   verbose=ns.verbose))
