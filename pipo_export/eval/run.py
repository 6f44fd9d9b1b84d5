"""`pipo-export eval OUT --text FILE`: the quality of an export, teacher forced on a text.

The text is tokenized with the export's tokenizer and cut into windows of `context` tokens (the
last one shorter; an odd token at its end is dropped). Each window is scored from its first
pair on through the export's own graphs (pipo_export.eval.graphs), `batch` windows at a time,
and optionally against a reference (pipo_export.eval.reference). The figures are those of
pipo_export.eval.metrics.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipo_graphs.errors import PipoUserError

from pipo_export.eval.graphs import ExportScorer
from pipo_export.eval.metrics import TAUS, Accumulator, Scores
from pipo_export.eval.reference import (ReferenceWriter, ids_digest, open_reference,
    tokenizer_digest)

MIN_TOKENS = 4  # one pair of context and the pair it predicts
SCORES_BUDGET = 1 << 30  # bytes of logits one window group may hold (rows are cut to fit)


@dataclass
class EvalOptions:
    export: str
    text: str
    reference: str | None = None  # export folder, checkpoint folder or reference file
    save_reference: str | None = None
    context: int = 512  # tokens per window
    batch: int = 4  # windows scored at once
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    taus: tuple[float, ...] = TAUS
    progress: bool = True  # a progress bar on stderr when the run is long


def windows(ids: list[int], context: int) -> list[np.ndarray]:
    """Token ids -> windows of `context` tokens (the last shorter, each even, >= MIN_TOKENS)."""
    out = []
    for start in range(0, len(ids), context):
        w = ids[start:start + context]
        w = w[:len(w) - len(w) % 2]
        if len(w) >= MIN_TOKENS:
            out.append(np.asarray(w, np.int64))
    return out


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipoUserError(f"--text {path}: not UTF-8 text (byte {exc.start}); convert it to "
                            "UTF-8") from None


class Progress:
    """A progress bar on stderr, shown once a run has taken more than `after` seconds."""

    def __init__(self, total: int, enabled: bool, after: float = 1.0, width: int = 30):
        self.total, self.enabled, self.after, self.width = total, enabled, after, width
        self.done, self.start, self.last, self.shown = 0, time.perf_counter(), 0.0, False

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or now - self.start < self.after or \
                (now - self.last < 0.2 and self.done < self.total):
            return
        self.last, self.shown = now, True
        frac = self.done / self.total
        left = (now - self.start) / self.done * (self.total - self.done)
        bar = "#" * int(frac * self.width)
        print(f"\reval [{bar:<{self.width}}] {frac:4.0%} {self.done}/{self.total} pairs, "
              f"~{left:.0f}s left", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


def evaluate(opts: EvalOptions) -> dict:
    """Run the eval (see the module doc) -> the report (eval.metrics.Accumulator.summary plus
    what was scored)."""
    if opts.context < MIN_TOKENS or opts.context % 2:
        raise PipoUserError(f"--context must be an even number of tokens >= {MIN_TOKENS}, got "
                            f"{opts.context}")
    if opts.batch < 1:
        raise PipoUserError(f"--batch must be >= 1, got {opts.batch}")
    from pipo_runtime.text import load_tokenizer
    folder = Path(opts.export)
    scorer = ExportScorer.load(folder, opts.threads)
    tokenizer = load_tokenizer(scorer.tokenizer_path)
    if tokenizer is None:
        raise PipoUserError(f"{folder} has no tokenizer.json, so --text cannot be tokenized; "
                            "export from a checkpoint folder that holds one")
    if opts.context > scorer.max_context:
        raise PipoUserError(f"--context {opts.context} is over the export's max_context "
                            f"{scorer.max_context}")
    ids = tokenizer.encode(read_text(opts.text), add_special_tokens=False).ids
    if len(ids) < MIN_TOKENS:
        raise PipoUserError(f"--text {opts.text}: {len(ids)} tokens; eval needs at least "
                            f"{MIN_TOKENS} (a pair of context and the pair it predicts)")
    wins = windows(ids, opts.context)
    lengths = [len(w) for w in wins]
    positions = sum(t // 2 - 1 for t in lengths)
    facts = {"vocab_size": scorer.vocab_size, "tokenizer": tokenizer,
             "tokenizer_sha256": tokenizer_digest(tokenizer), "context": opts.context,
             "ids_sha256": ids_digest(np.asarray(ids, np.int64))}
    reference = open_reference(opts.reference, facts, opts.threads) if opts.reference else None
    writer = None
    if opts.save_reference:
        writer = ReferenceWriter(Path(opts.save_reference), {
            **{k: facts[k] for k in ("vocab_size", "tokenizer_sha256", "ids_sha256", "context")},
            "windows": lengths, "positions": positions, "source": scorer.label})
    acc, progress = Accumulator(), Progress(positions, opts.progress)
    try:
        for start, group in _groups(lengths, opts.batch, scorer.vocab_size):
            batch = np.stack(wins[start:start + group])
            subject = Scores.from_logits(*scorer.score(batch, lambda: progress(group)))
            acc.add(batch, subject, reference.scores(batch, start) if reference else None)
            if writer:
                writer.add(subject)
        if writer:
            writer.close()
    except BaseException:
        if writer:
            writer.discard()
        raise
    finally:
        progress.close()
    report = {"export": str(folder), "text": str(opts.text), "tokens": len(ids),
              "scored_tokens": sum(lengths), "windows": len(wins), "context": opts.context,
              "reference_source": reference.label if reference else None,
              **acc.summary(opts.taus)}
    if writer:
        report["saved_reference"] = str(opts.save_reference)
    return report


def _groups(lengths: list[int], batch: int, vocab: int):
    """(first window, count) of runs of equal-length windows, at most `batch` (and what
    SCORES_BUDGET allows) each."""
    start = 0
    while start < len(lengths):
        t = lengths[start]
        rows = max(1, min(batch, SCORES_BUDGET // ((t // 2) * vocab * 40)))
        n = 1
        while n < rows and start + n < len(lengths) and lengths[start + n] == t:
            n += 1
        yield start, n
        start += n


def format_report(r: dict) -> str:
    """The report as a few aligned lines."""
    lines = [f"eval {r['export']} on {r['text']}: {r['tokens']:,} tokens, {r['windows']} "
             f"window(s) of <= {r['context']}, {r['positions']:,} scored pairs"]
    ref = r.get("reference")
    if ref:
        lines.append(f"reference: {r['reference_source']}")
    lines.append(f"{'':24}{'export':>10}" + (f"{'reference':>12}{'ln ratio':>10}" if ref else ""))
    for i, tok in ((1, "token1"), (2, "token2")):
        line = f"perplexity token {i}{'':7}{r['perplexity'][tok]:>10.4g}"
        if ref:
            line += f"{ref['perplexity'][tok]:>12.4g}{ref['ln_ppl_ratio'][tok]:>+10.4f}"
        lines.append(line)
    if ref:
        lines.append(f"{'KL(ref || export)':24}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"
                     f"{'max':>10}{'top-1 agree':>13}")
        for i, tok in ((1, "token1"), (2, "token2")):
            kl = ref["kl"][tok]
            lines.append(f"  token {i}{'':16}" + "".join(f"{kl[k]:>10.3g}" for k in
                                                      ("mean", "p50", "p90", "p99", "max"))
                         + f"{ref['top1_agreement'][tok]:>12.2%}")
    gate = r["gate"]
    conf = f"gate: mean confidence {gate['mean_confidence']:.4f}"
    if "reference_mean_confidence" in gate:
        conf += f" (reference {gate['reference_mean_confidence']:.4f})"
    lines.append(conf)
    lines.append(f"  {'tau':>5}{'commit':>10}" + (f"{'reference':>11}" if ref else "")
                 + f"{'tokens/step':>13}" + (f"{'reference':>11}" if ref else ""))
    for row in gate["taus"]:
        line = f"  {row['tau']:>5.2f}{row['commit_rate']:>10.2%}"
        if ref:
            line += f"{row['reference_commit_rate']:>11.2%}"
        line += f"{row['tokens_per_step']:>13.3f}"
        if ref:
            line += f"{row['reference_tokens_per_step']:>11.3f}"
        lines.append(line)
    if r.get("saved_reference"):
        lines.append(f"saved this export's scores as a reference: {r['saved_reference']}")
    return "\n".join(lines)
