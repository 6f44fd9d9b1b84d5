"""The one contract every backend implements, and the options a session is loaded with.

A `StepRunner` runs one generation's steps and keeps the states inside the backend:

    prefill(feeds) -> (pair [B, 2] int64, confidence [B] float32)
        feeds: the prefill graph's inputs as numpy (pipo_runtime.requests.prefill_feeds); on a
        contract 1.1 export optionally past.<state> (numpy, or what `past()` returned) and
        next_token: the sequences it continues (absent: fresh sequences, `prefill_extras`)
    past() -> {past.<state>: value}                    the last step's states, as prefill takes
                                                       them back (the backend's own values)
    decode(uniforms [B, 2]) -> (pair, confidence)     the next step; states stay inside
    outputs() -> {name: numpy}                         every output of the last step (compare)
    facts(facts) -> ModelFacts                         what requests are checked against
    begin() -> StepRunner / end()                      one generation's runner (see below)
    close()

Threads: the loaded runner holds the graphs and weights; `begin()` gives one generation its own
runner over them (by default a shallow copy: every state attribute is assigned anew by
`prefill`), and `end()` frees that generation's states. A backend whose graphs cannot run two
generations at once sets `concurrent = False`; PipoSession then runs its generations one at a
time on the loaded runner itself.

A backend module (registered in pipo_runtime.backends) provides
`load(folder, manifest, options) -> StepRunner`; `manifest` is None only for a backend that
sets `RUNS_CHECKPOINTS = True` and is given a checkpoint folder.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from pipo_graphs.contract import NEXT_TOKEN, PAST, present_to_past
from pipo_graphs.errors import PipoUserError

from pipo_runtime.requests import ModelFacts, empty_past

CANNOT_CONTINUE = ("this export's prefill takes no past states (graph contract 1.0), so it cannot "
                   "continue a sequence; re-export it with this pipo-export (contract 1.1)")


class BackendError(PipoUserError):
    """A backend failed while running a graph that passed the manifest checks."""


class OrtOptimization(str, Enum):
    """How ONNX Runtime optimizes the graphs (the onnxruntime backend).

    mapped: basic optimizations without constant folding: every weight stays the one mapped copy
        of weights.data (float16 weights too: ORT's CPU kernels then cast them per step).
    all:    ORT_ENABLE_ALL: on CPU, float16 weights get float32 copies made at load
        (InsertCastTransformer + constant folding), about 3x the weight bytes in memory.
    auto:   `mapped` when the graphs hold float16 weights, `all` otherwise.
    """

    AUTO = "auto"
    MAPPED = "mapped"
    ALL = "all"


@dataclass
class RunnerOptions:
    """Options of PipoSession.load; each backend reads the ones it knows.

    providers, threads, session_options, optimization, prepack: onnxruntime (prepacking copies
    every float weight per session, so it is on by default only where the graphs hold quantized
    weights: MatMulNBits is 5x slower unpacked). A caller's
    `session_options` is used as given (never modified): threads and optimization apply, and
    the two sessions share one mapping of weights.data, only when the runtime creates the
    options itself.
    checkpoint, base, dtype: torch (the export's source checkpoint unless `checkpoint` is
    given; `base` for a PEFT adapter; `dtype` of the weights when running a checkpoint folder).
    """

    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0  # intra-op threads; 0 = ORT's default
    session_options: Any = None
    optimization: OrtOptimization = OrtOptimization.AUTO
    prepack: bool | None = None  # ORT kernel weight repacking; None: only for MatMulNBits graphs
    checkpoint: str | None = None
    base: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) \
                or not 0 <= self.threads <= 1024:
            raise PipoUserError(f"threads must be an integer in [0, 1024] (0 = ONNX Runtime's "
                                f"default), got {self.threads!r}")


def prefill_extras(inputs, feeds: dict, batch: int) -> dict:
    """The past.<state> and next_token inputs of a prefill: those in `feeds`, the others of a
    contract 1.1 graph (`inputs`: its inputs, see requests.empty_past) empty. PipoUserError
    (CANNOT_CONTINUE) when `feeds` continue sequences and the graph (1.0) takes no past."""
    given = {k: v for k, v in feeds.items() if k.startswith(PAST) or k == NEXT_TOKEN}
    if given and NEXT_TOKEN not in {t.name for t in inputs}:
        raise PipoUserError(CANNOT_CONTINUE)
    return {**{k: v for k, v in empty_past(inputs, batch).items() if k not in given}, **given}


class StepRunner:
    """One backend's prefill and decode steps (see the module doc)."""

    name = "step runner"
    concurrent = True  # generations may run at once on runners from begin()

    def begin(self) -> "StepRunner":
        """A runner for one generation, sharing this one's graphs and weights."""
        return copy.copy(self)

    def end(self) -> None:
        """Free this generation's states (the runner from `begin`)."""

    def prefill(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decode(self, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def outputs(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def past(self) -> dict[str, Any]:
        """The last step's states as past.<state> (host copies unless a backend overrides it)."""
        return present_to_past(self.outputs())

    def facts(self, facts: ModelFacts | None) -> ModelFacts:
        """The model facts requests are checked against: the manifest's by default. A backend
        may narrow them (TensorRT engines built for a shorter context) or supply them (a
        checkpoint folder has no manifest)."""
        if facts is None:
            raise PipoUserError(f"the {self.name} backend runs export folders")
        return facts

    def close(self) -> None:
        pass
