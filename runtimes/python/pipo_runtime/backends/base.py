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

Rows (continuous batching, pipo_runtime.engine): a runner holds one batch's states, and the
sampling inputs of its rows, from step to step. Every state is per row; the attention caches
and attention_mask also share the pair axis (past_pairs), which takes masked holes.

    rows() -> int                                      rows held (0: an empty runner from begin())
    merge(other)                                       append other's rows (other keeps its own);
                                                       the shorter pair axis is padded with holes
    select(rows, trim=False)                           keep `rows` (indices), in that order
                                                       (trim: and drop emptied columns, one copy)
    trim() -> int                                      drop the columns that are a hole in every
                                                       row; -> columns dropped
    attention_mask() -> [B, P] bool                    a host copy of the holes (small)

decode(uniforms) then runs every row held, with each row's own sampling inputs (the ones its
prefill was given). Layout: each row's real slots stay contiguous at the right end of the pair
axis (pipo_runtime.backends.rows), so columns freed by rows that leave are on the left.
The default implementation goes through the host (`host_states`/`load_states`, numpy); a
backend that keeps its states on a device overrides the five methods (TensorRT). Joins and
leaves copy states; decode steps never do.

Threads: the loaded runner holds the graphs and weights; `begin()` gives one generation its own
runner over them (by default a shallow copy, cleared: every state attribute is assigned anew
by `prefill`), and `end()` frees that generation's states. A backend whose graphs cannot run two
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

from pipo_graphs.contract import NEXT_TOKEN, PAST, present_to_past
from pipo_graphs.errors import PipoUserError

from pipo_runtime.backends import rows as host_rows
from pipo_runtime.requests import ModelFacts, empty_past

CANNOT_CONTINUE = ("this export's prefill takes no past states (graph contract 1.0), so it cannot "
                   "continue a sequence; re-export it with this pipo-export (contract 1.1)")


class BackendError(RuntimeError):
    """A backend failed while running a graph that passed the manifest checks: a bug (in the
    export or the backend), not bad input, so it is no PipoUserError and keeps its traceback
    (the backend's own exception is its __cause__). Problems the user can fix (a stale engine,
    a missing provider) raise PipoUserError subclasses instead."""


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

    providers, threads, spinning, session_options, optimization, prepack: onnxruntime
    (spinning: idle intra-op threads spin for the next op, lower latency at the cost of busy
    cores; a server turns it off so an idle server uses no CPU; prepacking copies
    every float weight per session, so it is on by default only where the graphs hold quantized
    weights: MatMulNBits is 5x slower unpacked). A caller's
    `session_options` is used as given (never modified): threads and optimization apply, and
    the two sessions share one mapping of weights.data, only when the runtime creates the
    options itself.
    checkpoint, base, adapters, dtype: torch (the export's source checkpoint unless
    `checkpoint` is given; `base` for a PEFT adapter folder; `adapters`: more PEFT adapter
    folders merged, in order, after the loaded folder; `dtype` of the weights when running a
    checkpoint folder).
    """

    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0  # intra-op threads; 0 = ORT's default
    spinning: bool = True  # ORT's session.intra_op.allow_spinning
    session_options: Any = None
    optimization: OrtOptimization = OrtOptimization.AUTO
    prepack: bool | None = None  # ORT kernel weight repacking; None: only for MatMulNBits graphs
    checkpoint: str | None = None
    base: str | None = None
    adapters: tuple[str, ...] = ()
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
        """A runner for one generation (no states yet), sharing this one's graphs and weights."""
        runner = copy.copy(self)
        runner.end()
        return runner

    def end(self) -> None:
        """Free this generation's states (the runner from `begin`)."""

    def prefill(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def decode(self, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def outputs(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # ------------------------------------------------------------------ rows (host path)
    pair_axes: dict[str, int] = {}  # present.X -> axis of past_pairs (set by each backend)
    max_rows: int | None = None  # rows a batch may hold (TensorRT: the engines' max_batch)

    def host_states(self) -> dict[str, np.ndarray]:
        """Every per-row array the next decode reads, as numpy: present.X, pair and the
        sampling inputs, batch on axis 0 ({} when empty)."""
        raise NotImplementedError

    def load_states(self, states: dict[str, np.ndarray]) -> None:
        """Hold `states` (as host_states gives them) as this runner's batch."""
        raise NotImplementedError

    def has_rows(self) -> bool:
        """Whether this backend implements the row operations (host path or its own)."""
        cls = type(self)
        return cls.host_states is not StepRunner.host_states or cls.merge is not StepRunner.merge

    def rows(self) -> int:
        return host_rows.batch_rows(self.host_states())

    def attention_mask(self) -> np.ndarray:
        return self.host_states()[host_rows.MASK]

    def merge(self, other: "StepRunner") -> None:
        aligned = host_rows.align_right(other.host_states(), self.pair_axes)
        mine = host_rows.align_right(self.host_states(), self.pair_axes)
        self.load_states(host_rows.merge_rows(mine, aligned, self.pair_axes))

    def select(self, rows: list[int], trim: bool = False) -> None:
        states = host_rows.select_rows(self.host_states(), list(rows))
        self.load_states(host_rows.trim_columns(states, self.pair_axes) if trim else states)

    def trim(self) -> int:
        if not self.rows():
            return 0
        keep = self.attention_mask().any(axis=0)
        if keep.all():
            return 0  # nothing copied
        self.load_states(host_rows.trim_columns(self.host_states(), self.pair_axes))
        return int(keep.size - keep.sum())

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
