"""Quality figures of teacher-forced pair predictions (numpy only).

Per scored pair position: the negative log-likelihood of the true token 1 (backbone) and token 2
(MTP head), the gate's confidence, and against a reference: KL(reference || subject) of each
token's distribution and whether their top-1 tokens agree. `Accumulator` collects them window
by window (only scalars per position are kept); `summary` turns them into the report:
perplexities, ln(PPL/PPL_ref), KL mean and percentiles (as llama.cpp's --kl-divergence), top-1
agreement, and the gate at each tau: commit rate (confidence >= tau, the gate of
docs/contract.md) and tokens per decode step (token 1 always, token 2 when committed:
1 + commit rate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TAUS = (0.3, 0.5, 0.7, 0.9)
TOKENS = ("token1", "token2")
PERCENTILES = (50, 90, 99)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits [..., V] -> log-probabilities [..., V] float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def targets(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, T] (T even) -> the true token 1 and token 2 of every scored pair position
    [B, T/2 - 1] each: position i predicts t_2i+2 (token 1) and t_2i+3 (token 2)."""
    return ids[:, 2::2], ids[:, 3::2]


@dataclass
class Scores:
    """One window group's predictions, flattened over positions: log-probabilities of token 1
    and token 2 [N, V] (float64 or float32) and the gate's confidence [N]."""

    logp1: np.ndarray
    logp2: np.ndarray
    confidence: np.ndarray

    @classmethod
    def from_logits(cls, logits1, logits2, confidence) -> "Scores":
        """logits [B, n, V], confidence [B, n] -> Scores over B*n positions."""
        v = logits1.shape[-1]
        return cls(log_softmax(logits1.reshape(-1, v)), log_softmax(logits2.reshape(-1, v)),
                   np.asarray(confidence, np.float64).reshape(-1))


def _kl(ref: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """KL(ref || sub) per row of log-probabilities [N, V] -> [N] (>= 0, float64)."""
    ref, sub = np.asarray(ref, np.float64), np.asarray(sub, np.float64)
    return np.maximum((np.exp(ref) * (ref - sub)).sum(axis=-1), 0.0)


def _nll(logp: np.ndarray, target: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(np.asarray(logp, np.float64), target.reshape(-1, 1), 1)[:, 0]


@dataclass
class Accumulator:
    """Per-position scalars of the subject (and of its reference, when given)."""

    columns: dict = field(default_factory=dict)  # name -> list of [N] arrays

    def _put(self, **values):
        for name, value in values.items():
            self.columns.setdefault(name, []).append(np.asarray(value, np.float64))

    def add(self, ids: np.ndarray, subject: Scores, reference: Scores | None = None) -> None:
        """ids [B, T] of the window group the scores were computed on."""
        t1, t2 = (t.reshape(-1) for t in targets(ids))
        self._put(nll1=_nll(subject.logp1, t1), nll2=_nll(subject.logp2, t2),
                  confidence=subject.confidence)
        if reference is None:
            return
        self._put(ref_nll1=_nll(reference.logp1, t1), ref_nll2=_nll(reference.logp2, t2),
                  ref_confidence=reference.confidence,
                  kl1=_kl(reference.logp1, subject.logp1), kl2=_kl(reference.logp2, subject.logp2),
                  agree1=subject.logp1.argmax(-1) == reference.logp1.argmax(-1),
                  agree2=subject.logp2.argmax(-1) == reference.logp2.argmax(-1))

    def column(self, name: str) -> np.ndarray:
        return np.concatenate(self.columns[name])

    def summary(self, taus=TAUS) -> dict:
        """The report (see the module doc); the reference's figures when it was given."""
        has_ref = "kl1" in self.columns
        out = {"positions": int(self.column("nll1").size),
               "perplexity": {tok: float(np.exp(self.column(f"nll{i}").mean()))
                              for i, tok in enumerate(TOKENS, 1)}}
        if has_ref:
            ref_ppl = {tok: float(np.exp(self.column(f"ref_nll{i}").mean()))
                       for i, tok in enumerate(TOKENS, 1)}
            out["reference"] = {
                "perplexity": ref_ppl,
                "ln_ppl_ratio": {tok: float(np.log(out["perplexity"][tok] / ref_ppl[tok]))
                                 for tok in TOKENS},
                "kl": {tok: _distribution(self.column(f"kl{i}"))
                       for i, tok in enumerate(TOKENS, 1)},
                "top1_agreement": {tok: float(self.column(f"agree{i}").mean())
                                   for i, tok in enumerate(TOKENS, 1)}}
        out["gate"] = _gate(self.column("confidence"),
                            self.column("ref_confidence") if has_ref else None, taus)
        return out


def _distribution(x: np.ndarray) -> dict:
    out = {"mean": float(x.mean())}
    out.update({f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES})
    out["max"] = float(x.max())
    return out


def _gate(conf: np.ndarray, ref: np.ndarray | None, taus) -> dict:
    out = {"mean_confidence": float(conf.mean()), "taus": []}
    if ref is not None:
        out["reference_mean_confidence"] = float(ref.mean())
    for tau in taus:
        row = {"tau": tau, "commit_rate": float((conf >= tau).mean())}
        row["tokens_per_step"] = 1 + row["commit_rate"]
        if ref is not None:
            row["reference_commit_rate"] = float((ref >= tau).mean())
            row["reference_tokens_per_step"] = 1 + row["reference_commit_rate"]
        out["taus"].append(row)
    return out
