"""Host-side PIPO semantics every runtime shares: prompt packing and what the user sees."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import PipoUserError


def pack_prompts(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts with PAD to one even length.

    -> input_ids [B, T] int64 (T = max length rounded up to even), lengths [B] int64.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PipoUserError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    t = longest + (longest % 2)
    ids = np.full((len(prompts), t), pad_id, dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    return ids, np.array([len(p) for p in prompts], dtype=np.int64)


@dataclass
class SequenceOutput:
    """One sequence's generation: raw pairs (PAD included), a confidence per step, user tokens."""

    pairs: list[list[int]] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "stop", "length"
    commits: int = 0  # pairs whose token2 was kept (not PAD)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def commit_rate(self) -> float:
        return self.commits / len(self.pairs) if self.pairs else 0.0

    def add_pair(self, pair, conf: float, pad_id: int, eos_ids: set[int],
                 stop_ids: set[int] = frozenset()) -> list[int]:
        """Record one emitted pair; return the tokens it adds for the user.

        PAD is never shown; generation ends at EOS (or a stop id) whether it is token1 or
        token2, and a token2 after an ending token1 is dropped (docs/contract.md).
        """
        self.pairs.append([int(pair[0]), int(pair[1])])
        self.confidence.append(float(conf))
        self.commits += int(pair[1]) != pad_id
        new = []
        for token in self.pairs[-1]:
            if token in eos_ids or token in stop_ids:
                self.finish_reason = "eos" if token in eos_ids else "stop"
                break
            if token != pad_id:
                new.append(token)
        self.tokens.extend(new)
        return new
