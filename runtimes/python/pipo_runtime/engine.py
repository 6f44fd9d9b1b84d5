"""TEMPORARY stand-in for the continuous-batching engine (ENGINE_API.md), so the server can be
built and tested before the real engine lands. The lead replaces this file with the engine
helper's at merge. It has the engine's API and nothing else: one thread per request over
PipoSession.stream (thread-safe), no batching, no scheduler, no prefix cache.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from typing import Callable

from pipo_runtime.session import GenerationConfig, PipoSession, SequenceResult


class QueueFull(Exception):
    """max_queue requests are already waiting."""


@dataclass
class EngineConfig:
    max_batch: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 2048
    cache_bytes: int = 0


@dataclass
class EngineEvent:
    tokens: list[int]
    text: str
    step: int
    done: bool = False
    result: SequenceResult | None = None


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    rows_per_step: int = 0
    padding_ratio: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    commits: int = 0
    pairs: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    cancelled: int = 0


class RequestHandle:
    def __init__(self, sink: Callable[[EngineEvent], None] | None):
        self._sink, self._events = sink, queue.Queue()
        self._cancel, self._done = threading.Event(), threading.Event()
        self._result: SequenceResult | None = None

    def _emit(self, event: EngineEvent) -> None:
        if event.done:
            self._result = event.result
            self._done.set()
        (self._sink or self._events.put)(event)

    def __iter__(self):
        while True:
            event = self._events.get()
            yield event
            if event.done:
                return

    def cancel(self) -> None:
        self._cancel.set()

    def result(self, timeout: float | None = None) -> SequenceResult:
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished")
        return self._result


class Engine:
    def __init__(self, session: PipoSession, config: EngineConfig):
        self.session, self.config = session, config
        self._slots = threading.Semaphore(config.max_batch)
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._threads: set[threading.Thread] = set()
        self._handles: set[RequestHandle] = set()
        self._closed = False

    def submit(self, prompt, gen_config: GenerationConfig, seq: int = 0,
               sink=None) -> RequestHandle:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        ids = self.session._prompts(prompt)[0]
        stream = self.session.stream([ids], replace(gen_config, seq_offset=seq))
        handle = RequestHandle(sink)
        with self._lock:
            if self._stats.waiting >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are waiting")
            self._stats.waiting += 1
            thread = threading.Thread(target=self._run, args=(stream, ids, gen_config, handle),
                                      daemon=True)
            self._threads.add(thread)
            self._handles.add(handle)
        thread.start()
        return handle

    def _run(self, stream, ids, gen_config, handle: RequestHandle) -> None:
        hold = max((len(s) for s in gen_config.stop_strings), default=1) - 1
        with self._slots:
            with self._lock:
                self._stats.waiting -= 1
                self._stats.running += 1
                self._stats.prompt_tokens += len(ids)
            seen, sent, step = "", 0, 0
            try:
                for ev in stream:
                    if handle._cancel.is_set():
                        break
                    seen += ev.text
                    safe = len(seen) - hold if hold else len(seen)
                    text, sent = seen[sent:max(safe, sent)], max(safe, sent)
                    step = ev.step
                    with self._lock:
                        self._stats.steps += 1
                        self._stats.generated_tokens += len(ev.tokens)
                    handle._emit(EngineEvent(ev.tokens, text, ev.step))
            finally:
                stream.close()
            if handle._cancel.is_set():
                out = SequenceResult(finish_reason="cancelled")
            else:
                out = stream.result.sequences[0]
            out.prompt_tokens, out.cached_tokens = len(ids), 0
            with self._lock:
                self._stats.running -= 1
                self._stats.cancelled += handle._cancel.is_set()
                self._stats.commits += out.commits
                self._stats.pairs += len(out.pairs)
                self._handles.discard(handle)
                self._threads.discard(threading.current_thread())
            rest = (out.text or "")[sent:] if out.finish_reason != "cancelled" else ""
            handle._emit(EngineEvent([], rest, step, done=True, result=out))

    def stats(self) -> EngineStats:
        with self._lock:
            return replace(self._stats, rows_per_step=self._stats.running)

    def shutdown(self, drain_timeout: float | None = None) -> None:
        self._closed = True
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(drain_timeout)
        with self._lock:
            handles, threads = list(self._handles), list(self._threads)
        for h in handles:
            h.cancel()
        for t in threads:
            t.join()
