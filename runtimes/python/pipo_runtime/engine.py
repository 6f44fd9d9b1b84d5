"""The engine: continuous batching of independent requests over one PipoSession (torch-free).

    engine = Engine(session, EngineConfig(max_batch=8))
    handle = engine.submit("Hello", GenerationConfig(max_new_tokens=64), seq=0)
    for event in handle: print(event.text, end="")     # EngineEvents until done
    handle.result()                                     # the SequenceResult
    engine.shutdown()

One scheduler thread owns the runner and the batch; callers only submit, iterate and cancel.
Each tick it (1) drops finished and cancelled rows (select + trim), (2) admits waiting requests
in arrival order within `max_batch` rows and `max_prefill_tokens` prefill tokens, (3) prefills
them as one batch and merges their states into the running batch, (4) runs one decode step for
every row. A request's tokens never depend on what shares its batch: its uniforms come from its
own seed, seq and step count (SequenceTracker), so it gives exactly what
`session.generate(prompt, replace(config, seq_offset=seq))` gives alone (confidences within
float rounding: the batch size changes the GEMMs' summation order).

Contract 1.1 (pipo_runtime.engine_prefill): a prompt longer than `max_prefill_tokens` is
prefilled in chunks, one per tick between decode steps, then joins the batch; with
`cache_bytes` > 0 finished requests leave their states in a PrefixCache keyed by their token
history, and a prompt that extends a cached history prefills only its new tokens. Either way a
request gives the tokens of its whole prompt prefilled at once.

Batch-wide branches: the decode graph takes its argmax-only sampler and skips the MTP head only
when every row qualifies; a row with tau >= 1 reports SKIPPED_CONFIDENCE as it would alone.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from pipo_graphs.errors import PipoUserError

from pipo_runtime.backends import rows as host_rows
from pipo_runtime.engine_prefill import EnginePrefill
from pipo_runtime.requests import check_request, token_ids
from pipo_runtime.sequence import SequenceResult, SequenceTracker
from pipo_runtime.session import GenerationConfig, PipoSession, decode_rows

CANCELLED, ERROR = "cancelled", "error"


class QueueFull(RuntimeError):
    """submit() found `max_queue` requests already waiting (retry later: HTTP 429)."""


@dataclass
class EngineConfig:
    max_batch: int = 8  # rows decoded together
    max_queue: int = 64  # waiting requests; submit() raises QueueFull beyond
    max_prefill_tokens: int = 2048  # prompt tokens (padded) prefilled per tick; a longer prompt
    # is admitted alone (with contract 1.1 also the chunk size of a chunked prefill)
    cache_bytes: int = 0  # prefix cache of saved states, LRU, 0 = off (contract 1.1)

    def __post_init__(self):
        for name, low in (("max_batch", 1), ("max_queue", 1), ("max_prefill_tokens", 2),
                          ("cache_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PipoUserError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class EngineEvent:
    tokens: list[int]  # user tokens this step added (0, 1 or 2)
    text: str  # text delta (never retracted; stop strings held back)
    step: int
    done: bool = False  # the last event of the request
    result: SequenceResult | None = None  # set on the last event


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0  # decode steps run
    rows_per_step: int = 0  # rows of the last decode step
    padding_ratio: float = 0.0  # cache slots that are holes, at the last decode step
    prompt_tokens: int = 0
    generated_tokens: int = 0
    commits: int = 0  # pairs whose token2 was kept
    pairs: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    cancelled: int = 0


class RequestHandle:
    """One submitted request: iterate its EngineEvents (without a sink), cancel it, or wait for
    its SequenceResult."""

    def __init__(self, sink: Callable[[EngineEvent], None] | None, wake: Callable[[], None]):
        self._sink, self._wake = sink, wake
        self._events: queue.SimpleQueue | None = queue.SimpleQueue() if sink is None else None
        self._cancel, self._finished = threading.Event(), threading.Event()
        self._result: SequenceResult | None = None
        self.error: Exception | None = None  # set when the backend failed (finish_reason error)

    def cancel(self) -> None:
        """Idempotent; the row is freed at the next tick (finish_reason "cancelled")."""
        self._cancel.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[EngineEvent]:
        if self._events is None:
            raise RuntimeError("this request's events go to its sink")
        while True:
            event = self._events.get()
            yield event
            if event.done:
                return

    def result(self, timeout: float | None = None) -> SequenceResult:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self._result

    def _emit(self, event: EngineEvent) -> None:
        """From the scheduler thread. A sink that raises cancels its request."""
        if event.done:
            self._result = event.result
        try:
            if self._sink is not None:
                self._sink(event)
            else:
                self._events.put(event)
        except Exception:  # the consumer is gone: stop generating for it
            self._cancel.set()
        if event.done:
            self._finished.set()


@dataclass
class _Request:
    handle: RequestHandle
    seq: SequenceTracker
    arrival: float = field(default_factory=time.monotonic)
    feed: list[int] | None = None  # tokens still to prefill (EnginePrefill.start sets them)
    past: Any = None  # the SequenceState they continue
    consumed: list[int] = field(default_factory=list)  # tokens its states hold


class Engine:
    """Continuous batching over `session` (see the module doc); starts one scheduler thread."""

    def __init__(self, session: PipoSession, config: EngineConfig | None = None):
        self.session, self.config = session, config or EngineConfig()
        if not session.runner.has_rows():
            raise PipoUserError(f"the {session.runner.name} backend has no row operations "
                                "(merge/select/trim); serve with onnxruntime, onnx-reference or "
                                "tensorrt")
        limit = session.runner.max_rows
        if limit is not None and self.config.max_batch > limit:
            raise PipoUserError(f"max_batch {self.config.max_batch} exceeds the {limit} rows the "
                                f"{session.runner.name} backend was built for")
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # in batch-row order
        self._chunking: _Request | None = None  # a long prompt between its chunks
        self._prefill = EnginePrefill(session, self.config.max_prefill_tokens,
                                      self.config.cache_bytes)
        self._batch = session.runner.begin()  # the running batch's states (empty)
        self._serial = session._serial or nullcontext()  # non-concurrent backends
        self._stats = EngineStats()
        self._holes = self._slots = 0  # of the batch's cache (padding_ratio)
        self._stopping, self._deadline = False, None
        self._thread = threading.Thread(target=self._loop, name="pipo-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, prompt, gen_config: GenerationConfig, seq: int = 0,
               sink: Callable[[EngineEvent], None] | None = None) -> RequestHandle:
        """Check the request now (PipoUserError, as PipoSession.stream does) and queue it.
        prompt: text (needs the tokenizer) or a list of ids; seq: the request's sequence index
        for the RNG (gen_config.seq_offset is ignored). QueueFull when max_queue are waiting,
        RuntimeError after shutdown."""
        prompts = self.session._prompts(prompt)
        if len(prompts) != 1:
            raise PipoUserError(f"submit takes one prompt, got {len(prompts)}; submit each")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 63:
            raise PipoUserError(f"seq must be an integer in [0, 2**63), got {seq!r}")
        config = replace(gen_config)
        steps = config.steps()
        config.sampling.validate()
        stop_ids = token_ids(config.stop_token_ids, "stop_token_ids")
        check_request(self.session.facts, prompts, steps, stop_ids)
        self.session.check_memory(prompts, steps)  # alone over the state budget: never fits
        handle = RequestHandle(sink, self._notify)
        tracker = SequenceTracker(self.session.facts, config, steps, seq, prompts[0],
                                  self.session.tokenizer)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue); retry")
            self._waiting.append(_Request(handle, tracker))
            self._cond.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cond:
            running = sum(not r.seq.done for r in self._running)  # done rows leave next tick
            return replace(self._stats, running=running, waiting=len(self._waiting))

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop taking requests; finish the accepted ones (queued included), cancelling those
        left after `drain_timeout` seconds (None: wait for all); join the thread."""
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._deadline = None if drain_timeout is None \
                    else time.monotonic() + drain_timeout
            self._cond.notify()
        self._thread.join()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ the scheduler
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._chunking or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    if not (self._waiting or self._running or self._chunking):
                        break
                    if self._deadline is not None and time.monotonic() >= self._deadline:
                        for request in [*self._waiting, *self._running,
                                        *[self._chunking] * (self._chunking is not None)]:
                            request.handle._cancel.set()
            try:
                with self._serial:
                    self._tick()
            except Exception as exc:  # a backend failure ends every request in flight
                self._fail(exc)
        self._batch.end()

    def _tick(self) -> None:
        self._drop()
        admitted = [] if self._chunk() else self._admit()
        if admitted:
            self._join(admitted)
        if self._running:
            self._decode()

    def _chunk(self) -> bool:
        """Tick part 2 while a long prompt is being prefilled: its next chunk (the tick's
        prefill budget) -> whether one ran."""
        request = self._chunking
        if request is None:
            return False
        if request.handle.cancelled:
            self._chunking = None
            self._finish(request, CANCELLED)
            return False
        if not self._prefill.needs_chunks(request):
            return False  # its last part joins the batch (_admit takes it first)
        try:
            self._stats.prompt_tokens += self._prefill.prefill_chunk(request)
        except Exception as exc:
            self._chunking = None
            request.handle.error = exc
            self._finish(request, ERROR)
            raise
        return True

    def _finish(self, request: _Request, reason: str) -> None:
        """End a request that is not done yet (cancelled, error): its last event."""
        text = request.seq.finish(reason)
        self._stats.cancelled += reason == CANCELLED
        self._done(request, [], text)

    def _done(self, request: _Request, tokens: list[int], text: str) -> None:
        out = request.seq.out
        request.handle._emit(EngineEvent(tokens, text, max(request.seq.step - 1, 0), True, out))

    def _accept(self, runner, requests: list[_Request], pair, conf) -> None:
        """One step's pair [B, 2] and confidence [B] for `requests` (`runner`'s rows): emit
        their events; the states of those that finished go to the prefix cache before their
        last event (a next turn sent on it finds them)."""
        finished = []
        for i, request in enumerate(requests):
            step, commits = request.seq.step, request.seq.out.commits
            tokens, text = request.seq.accept(pair[i], conf[i])
            self._stats.generated_tokens += len(tokens)
            self._stats.commits += request.seq.out.commits - commits
            self._stats.pairs += 1
            if request.seq.done:
                finished.append((i, request, tokens, text))
            elif tokens or text:
                request.handle._emit(EngineEvent(tokens, text, step))
        self._prefill.save(runner, [(i, r) for i, r, _, _ in finished])
        for _, request, tokens, text in finished:
            self._done(request, tokens, text)

    def _drop(self) -> None:
        """Tick part 1: free the rows of finished and cancelled requests."""
        keep = []
        for i, request in enumerate(self._running):
            if request.seq.done:
                continue  # its last event went out with its last step
            if request.handle.cancelled:
                self._finish(request, CANCELLED)
                continue
            keep.append(i)
        if len(keep) < len(self._running):
            self._batch.select(keep, trim=True)  # and drop the columns only they used
            self._running = [self._running[i] for i in keep]
            self._measure()

    def _admit(self) -> list[_Request]:
        """Tick part 2: a chunked prompt's last part, then waiting requests in arrival order,
        within max_batch rows and the prefill budget (padded tokens: rows x longest even feed).
        A feed longer than the budget starts its chunks when it comes first (contract 1.1), or
        goes alone (1.0)."""
        admitted, cancelled = [], []
        if self._chunking is not None:
            admitted, self._chunking = [self._chunking], None
        with self._cond:
            longest = max((len(r.feed) + len(r.feed) % 2 for r in admitted), default=0)
            while self._waiting and len(self._running) + len(admitted) < self.config.max_batch:
                request = self._waiting[0]
                if request.handle.cancelled:
                    cancelled.append(self._waiting.popleft())
                    continue
                if request.feed is None:
                    self._look_up(request)
                n = len(request.feed)
                if self._prefill.needs_chunks(request):
                    if not admitted:
                        self._chunking = self._waiting.popleft()
                    break
                cost = (len(admitted) + 1) * max(longest, n + n % 2)
                if admitted and cost > self.config.max_prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                longest = max(longest, n + n % 2)
        for request in cancelled:
            self._finish(request, CANCELLED)
        if self._chunking is not None:
            self._chunk()  # its first chunk, this tick
        return admitted

    def _look_up(self, request: _Request) -> None:
        hit = self._prefill.start(request)
        if hit is not None:
            self._stats.prefix_hits += hit
            self._stats.prefix_misses += not hit

    def _join(self, admitted: list[_Request]) -> None:
        """Tick part 3: prefill the admitted requests as one batch, merge the rows that go on."""
        new = self.session.runner.begin()
        try:
            pair, conf = self._prefill.prefill(new, admitted)
            self._stats.prompt_tokens += sum(len(r.feed) for r in admitted)
            self._accept(new, admitted, pair, conf)
            keep = [i for i, r in enumerate(admitted) if not r.seq.done]
            if keep:
                if len(keep) < len(admitted):
                    new.select(keep)
                if not self._batch.rows() and host_rows.is_aligned(new.attention_mask()):
                    self._batch, new = new, self._batch  # the newcomers are the batch: no copy
                else:
                    self._batch.merge(new)
                with self._cond:
                    self._running += [admitted[i] for i in keep]
                self._measure()
        except Exception as exc:
            for request in admitted:
                if not request.seq.done and request not in self._running:
                    request.handle.error = exc
                    self._finish(request, ERROR)
            raise
        finally:
            new.end()

    def _decode(self) -> None:
        """Tick part 4: one decode step of every row."""
        pair, conf = decode_rows(self._batch, [r.seq for r in self._running])
        self._slots += 1
        rows = len(self._running)
        self._stats.steps += 1
        self._stats.rows_per_step = rows
        self._stats.padding_ratio = self._holes / (rows * self._slots)
        self._accept(self._batch, self._running, pair, conf)

    def _measure(self) -> None:
        """Holes and slots of the batch's cache, after rows joined or left."""
        if not self._running:
            self._holes = self._slots = 0
            return
        mask = self._batch.attention_mask()
        self._holes, self._slots = host_rows.holes(mask), mask.shape[1]

    def _fail(self, exc: Exception) -> None:
        """A step raised: end every request in flight with finish_reason "error"."""
        with self._cond:
            running, self._running = self._running, []
            if self._chunking is not None:
                running.append(self._chunking)
                self._chunking = None
        for request in running:
            if not request.seq.done:
                request.handle.error = exc
                self._finish(request, ERROR)
        self._batch.end()
        self._holes = self._slots = 0
