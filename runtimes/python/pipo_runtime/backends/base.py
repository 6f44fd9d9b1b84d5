"""The one contract every backend implements, and the options a session is loaded with.

A `StepRunner` runs one generation's steps and keeps the states inside the backend:

    prefill(feeds) -> (pair [B, 2] int64, confidence [B] float32)
        feeds: the prefill graph's inputs as numpy (pipo_runtime.requests.prefill_feeds)
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
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from pipo_graphs.errors import PipoUserError

from pipo_runtime.requests import ModelFacts


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
    # bytes of states (past and present of one step) a request may need; None: half this
    # machine's memory; 0: no limit
    max_state_bytes: int | None = None
    # prompt tokens of one request, padded (rows x longest prompt): prefill's activations grow
    # with it (attention: with its square); 0: no limit
    max_batch_tokens: int = 1 << 18

    def state_budget(self) -> int | None:
        """max_state_bytes resolved: None when unlimited."""
        if self.max_state_bytes is None:
            pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
            return pages * os.sysconf("SC_PAGE_SIZE") // 2 if pages > 0 else None
        return self.max_state_bytes or None

    def __post_init__(self):
        most = max_threads()
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) \
                or not 0 <= self.threads <= most:
            raise PipoUserError(f"threads must be an integer in [0, {most}] ({THREADS_PER_CORE}x "
                                f"the {os.cpu_count()} cores here; 0 = ONNX Runtime's default), "
                                f"got {self.threads!r}")
        for name in ("max_state_bytes", "max_batch_tokens"):
            budget = getattr(self, name)
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                       or budget < 0):
                raise PipoUserError(f"{name} must be an integer >= 0 (0 = no limit), got "
                                    f"{budget!r}")


THREADS_PER_CORE = 4  # more intra-op threads than this per core only thrash (1024 on 2 cores:
#                       minutes per step)


def max_threads() -> int:
    """The most intra-op threads a runner accepts on this machine."""
    return THREADS_PER_CORE * (os.cpu_count() or 1)


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

    def facts(self, facts: ModelFacts | None) -> ModelFacts:
        """The model facts requests are checked against: the manifest's by default. A backend
        may narrow them (TensorRT engines built for a shorter context) or supply them (a
        checkpoint folder has no manifest)."""
        if facts is None:
            raise PipoUserError(f"the {self.name} backend runs export folders")
        return facts

    def close(self) -> None:
        pass
