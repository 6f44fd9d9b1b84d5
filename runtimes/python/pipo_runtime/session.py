"""PipoSession: load an export folder (or, on the torch backend, a checkpoint folder) once, then
generate or stream. Every backend runs through it; its per-row logic (SequenceTracker: pairs to
user tokens, limits, stop ids and strings, text; row_feeds/decode_rows: each row's own
sampling inputs and random stream) is the one the engine (pipo_runtime.engine) runs too.

    session = PipoSession.load("out/", backend=Backend.ONNXRUNTIME, threads=2)
    result = session.generate(["Hello"] or [[5, 17, 300]], GenerationConfig(max_new_tokens=64))
    stream = session.stream([[5, 17, 300]], GenerationConfig(max_steps=32))
    for event in stream: ...
    stream.result  # the GenerationResult, once the stream is exhausted

Continuing sequences (graph contract 1.1, pipo_runtime.continuation): with
`GenerationConfig(save_state=True)` each result sequence carries its `state`; the next turn
`session.generate(new_tokens, config, past=state)` prefills only `state.pending + new_tokens`
and gives the tokens of generating from `state.history + new_tokens` from scratch.
`prefill_chunk=N` prefills prompts longer than N tokens in chunks of N (same tokens).

Threads: a session may be shared. Each call runs its own generation (its own states, sampling
inputs and result: `StepRunner.begin()`), over the backend's shared graphs and weights; a
backend that cannot run two generations at once (TensorRT: one execution context per graph)
runs them one after another. Concurrent calls give exactly what the same calls give serially.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from pipo_graphs import SamplingParams
from pipo_graphs.contract import Mode, continues
from pipo_graphs.errors import PipoUserError
from pipo_graphs.manifest import MANIFEST, Manifest
from pipo_graphs.shapes import state_bytes

from pipo_runtime.backends import Backend, backend_module, parse_backend
from pipo_runtime.backends.base import CANNOT_CONTINUE, RunnerOptions, StepRunner
from pipo_runtime.continuation import SequenceState, finished_state, prefill_continuing
from pipo_runtime.folder import TOKENIZER, open_export
from pipo_runtime.requests import (ModelFacts, check_request, row_prefill_feeds, row_uniforms,
                                   token_ids)
from pipo_runtime.sequence import SequenceResult, SequenceTracker
from pipo_runtime.text import encode, load_tokenizer

DEFAULT_MAX_STEPS = 16  # steps a run takes when neither max_steps nor max_new_tokens is given


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass
class GenerationConfig:
    """One request. Generation stops per row at EOS, a stop id/string, max_new_tokens user
    tokens, or after max_steps steps (prefill included; each step emits one pair)."""

    max_steps: int | None = None
    max_new_tokens: int | None = None
    threshold: float = -1.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    seq_offset: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # EOS ids are emitted like any token (fixed-length runs)
    save_state: bool = False  # keep each sequence's final states (SequenceResult.state)
    prefill_chunk: int | None = None  # prefill prompts in chunks of at most this many tokens

    def eos_ids(self, facts: ModelFacts) -> frozenset[int]:
        """The ids that end a row with finish_reason "eos": the model's, unless ignore_eos."""
        return frozenset() if self.ignore_eos else facts.eos_ids

    def steps(self) -> int:
        """Check the request's fields (type, range, finiteness); -> the steps it may take."""
        if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk)
                                               or self.prefill_chunk < 2 or self.prefill_chunk % 2):
            raise PipoUserError(f"prefill_chunk must be an even integer >= 2 (chunks hold whole "
                                f"pairs), got {self.prefill_chunk!r}")
        if not _is_real(self.threshold) or not math.isfinite(self.threshold):
            raise PipoUserError(f"threshold must be a finite number, got {self.threshold!r}")
        for name in ("max_steps", "max_new_tokens", "seed", "seq_offset"):
            value = getattr(self, name)
            if not _is_int(value) and (value is not None or name in ("seed", "seq_offset")):
                raise PipoUserError(f"{name} must be an integer, got {value!r}")
        if not 0 <= self.seed < 1 << 64 or not 0 <= self.seq_offset < 1 << 63:
            raise PipoUserError(f"seed must be in [0, 2**64) and seq_offset in [0, 2**63), got "
                                f"{self.seed} and {self.seq_offset}")
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise PipoUserError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.max_steps is None and self.max_new_tokens is None:
            raise PipoUserError("give max_steps or max_new_tokens")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise PipoUserError("max_new_tokens must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise PipoUserError("max_steps must be >= 1")
        if isinstance(self.stop_strings, str) or not all(
                isinstance(t, str) and t for t in self.stop_strings):
            raise PipoUserError(f"stop_strings must be a list of non-empty strings, got "
                                f"{self.stop_strings!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise PipoUserError(f"sampling must be a pipo_graphs.SamplingParams (e.g. "
                                f"SamplingParams(**your_dict)), got {type(self.sampling).__name__}")
        by_tokens = self.max_new_tokens if self.max_new_tokens is not None else 1 << 30
        return min(self.max_steps or 1 << 30, by_tokens)  # >= 1 user token per step unless PAD


@dataclass
class GenerationResult:
    sequences: list[SequenceResult]
    ttft_s: float = 0.0  # request start to the first pair
    decode_s: float = 0.0  # all decode steps
    steps: int = 0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(self.steps - 1, 1)

    @property
    def ms_per_token(self) -> float:
        """Decode time per user-visible token after the first step."""
        later = sum(len(s.tokens) - s.prefill_tokens for s in self.sequences)
        return 1e3 * self.decode_s / max(later, 1)


def row_feeds(rows: list[SequenceTracker], tokens: list[list[int]], pad_id: int) -> dict:
    """The prefill feeds of `tokens` (one list per row) with each row's own sampling settings
    and step-0 uniforms: input_ids [B, T even], lengths [B], sampling [B], uniforms [B, 2]."""
    return row_prefill_feeds(tokens, pad_id, [(r.config.sampling, r.config.threshold)
                                              for r in rows],
                             [r.uniform_key()[:2] for r in rows])


def decode_rows(runner: StepRunner, rows: list[SequenceTracker]) -> tuple[np.ndarray, np.ndarray]:
    """One decode step of every row `runner` holds (`rows`, in batch order), each with the
    uniforms of its own next step -> pair [B, 2], confidence [B]."""
    return runner.decode(row_uniforms([r.uniform_key() for r in rows]))


class GenerationStream:
    """The iterator `PipoSession.stream` returns: StreamEvents, then `.result` is set."""

    def __init__(self, events: Iterator[StreamEvent], result: GenerationResult):
        self._events, self._result = events, result
        self._done = False

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> "StreamEvent":
        try:
            return next(self._events)
        except StopIteration:
            self._done = True
            raise

    @property
    def result(self) -> GenerationResult:
        if not self._done:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return self._result

    def close(self) -> None:
        """Stop early (frees the generation's states)."""
        self._events.close()


@dataclass
class StreamEvent:
    row: int
    tokens: list[int]  # user tokens this step added to the row
    text: str = ""  # text delta (empty without a tokenizer)
    step: int = 0


class PipoSession:
    """A model on one backend: its StepRunner, the model facts requests are checked against,
    the tokenizer (when the folder has one) and, for an export, its manifest."""

    def __init__(self, folder: Path | None, facts: ModelFacts, runner: StepRunner,
                 tokenizer=None, manifest: Manifest | None = None):
        self.folder, self.runner, self.tokenizer, self.manifest = folder, runner, tokenizer, manifest
        self.facts = runner.facts(facts)
        self.max_state_bytes = None  # set by load (RunnerOptions.max_state_bytes)
        self.max_batch_tokens = 0  # set by load (RunnerOptions.max_batch_tokens)
        # held for a whole generation by backends whose generations cannot overlap
        self._serial = None if runner.concurrent else threading.Lock()

    @classmethod
    def load(cls, folder, backend: Backend | str = Backend.ONNXRUNTIME,
             options: RunnerOptions | None = None, **option_fields) -> "PipoSession":
        """Check the manifest (every field, contract version, sha256 of every file), then load
        the backend. `options` or its fields as keywords (providers=, threads=,
        session_options=, optimization=, checkpoint=, base=, dtype=; see RunnerOptions).
        A backend with RUNS_CHECKPOINTS (torch) also takes a checkpoint folder (no manifest)."""
        folder = Path(folder)
        options = replace(options or RunnerOptions(), **option_fields)
        module = backend_module(parse_backend(backend))
        export = None
        if (folder / MANIFEST).is_file() or not getattr(module, "RUNS_CHECKPOINTS", False):
            export = open_export(folder)  # every file it names checked (pipo_runtime.folder)
        manifest = export.manifest if export else None
        runner = module.load(folder, manifest, options)
        facts = ModelFacts.from_manifest(manifest) if manifest else None
        tokenizer = load_tokenizer(export.tokenizer if export else folder / TOKENIZER)
        session = cls(folder, facts, runner, tokenizer, manifest)
        session.max_state_bytes = options.state_budget()
        session.max_batch_tokens = options.max_batch_tokens
        return session

    def _prompts(self, prompts) -> list[list[int]]:
        """One prompt (text, ids) or a batch of them (a list, or a 2-D integer array) ->
        lists of ids; PipoUserError for anything else."""
        if isinstance(prompts, np.ndarray):
            prompts = [prompts] if prompts.ndim == 1 else list(prompts)
        elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                          and not isinstance(prompts[0], (str, list, tuple,
                                                                          np.ndarray))):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise PipoUserError(f"prompts must be text, token ids or a list of them, got "
                                f"{type(prompts).__name__}")
        out = [encode(self.tokenizer, p, self.folder) if isinstance(p, str)
               else token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if not out or any(len(p) == 0 for p in out):
            raise PipoUserError("empty prompt: every prompt needs at least one token")
        return out

    def _past(self, past, n: int) -> list[SequenceState | None]:
        """past (None, one SequenceState, or one per prompt) -> one entry per prompt."""
        if past is None:
            return [None] * n
        rows = [past] if isinstance(past, SequenceState) else list(past)
        if len(rows) != n or any(r is not None and not isinstance(r, SequenceState)
                                 for r in rows):
            raise PipoUserError(f"past must be a SequenceState or one (or None) per prompt: "
                                f"{n} prompts, got {len(rows)} entries")
        return rows

    def _check_continuation(self, past: list, config: GenerationConfig) -> None:
        """Refuse (one line) to continue sequences on an export whose contract cannot."""
        if self.manifest is None or continues(self.manifest.contract_version):
            return
        if any(p is not None for p in past) or config.prefill_chunk:
            raise PipoUserError(CANNOT_CONTINUE)

    def stream(self, prompts, config: GenerationConfig, past=None) -> GenerationStream:
        """Check the request (now), then yield user tokens (and text deltas) as steps complete;
        the returned stream's `.result` holds the GenerationResult once it is exhausted.
        past: SequenceStates the prompts continue (one, or one or None per prompt)."""
        if self.runner is None:
            raise PipoUserError("this PipoSession is closed; load the folder again")
        if not isinstance(config, GenerationConfig):
            raise PipoUserError(f"config must be a GenerationConfig, got "
                                f"{type(config).__name__}")
        prompts = self._prompts(prompts)
        past = self._past(past, len(prompts))
        steps = config.steps()
        config.sampling.validate()
        self._check_continuation(past, config)
        stop_ids = token_ids(config.stop_token_ids, "stop_token_ids")
        inputs = [list(p.pending) + t if p else t for t, p in zip(prompts, past)]
        check_request(self.facts, [list(p.consumed) + t if p else t
                                   for t, p in zip(inputs, past)], steps, stop_ids)
        self.check_memory(inputs, steps)
        result = GenerationResult([SequenceResult() for _ in prompts])
        return GenerationStream(self._events(inputs, past, config, steps, result), result)

    def _events(self, prompts: list[list[int]], past: list, config: GenerationConfig,
                steps: int, result: GenerationResult) -> Iterator[StreamEvent]:
        if self._serial is not None:
            with self._serial:
                yield from self._steps(self.runner, prompts, past, config, steps, result)
            return
        runner = self.runner.begin()  # this generation's states; graphs and weights shared
        try:
            yield from self._steps(runner, prompts, past, config, steps, result)
        finally:
            runner.end()

    @property
    def _pair_width(self) -> int:
        """Tokens the model reads per cache slot: 2 (pairs), 1 in regular mode."""
        regular = self.manifest is not None and self.manifest.export.mode == Mode.REGULAR
        return 1 if regular else 2

    def _steps(self, runner: StepRunner, prompts, past: list, config: GenerationConfig,
               steps: int, result: GenerationResult) -> Iterator[StreamEvent]:
        rows = [SequenceTracker(self.facts, config, steps, config.seq_offset + i, prompt,
                                self.tokenizer, out, len(p.consumed) if p else 0)
                for i, (prompt, p, out) in enumerate(zip(prompts, past, result.sequences))]
        start = time.perf_counter()
        pair, conf, consumed = prefill_continuing(
            runner, prompts, past, lambda idx, tokens: row_feeds([rows[r] for r in idx], tokens,
                                                                 self.facts.pad_id),
            config.prefill_chunk, self.facts.pad_id, self._pair_width)
        result.ttft_s = time.perf_counter() - start
        for step in range(steps):
            if step:
                t = time.perf_counter()
                pair, conf = decode_rows(runner, rows)
                result.decode_s += time.perf_counter() - t
            result.steps = step + 1
            for row, seq in enumerate(rows):
                if not seq.done:
                    new, delta = seq.accept(pair[row], conf[row])
                    if new or delta:
                        yield StreamEvent(row, new, delta, step)
            done = all(seq.done for seq in rows)
            if config.save_state:
                self._save(runner, [r.out for r in rows], consumed, done or step == steps - 1)
            if done:
                break

    def _save(self, runner: StepRunner, outs: list, consumed: list, last: bool) -> None:
        """Keep the states of the rows that finished this step (all rows at the last step)."""
        rows = [r for r, o in enumerate(outs) if o.state is None and (o.done or last)]
        values = runner.outputs() if rows else {}
        for r in rows:
            outs[r].state = finished_state(values, r, runner.pair_axes, consumed[r],
                                           outs[r].pairs, self._pair_width)

    def generate(self, prompts, config: GenerationConfig, past=None) -> GenerationResult:
        """Run to completion; exactly what `stream` yields, collected."""
        stream = self.stream(prompts, config, past)
        for _ in stream:
            pass
        return stream.result

    def check_memory(self, prompts: list[list[int]], steps: int) -> None:
        """Refuse, before allocating, a batch over RunnerOptions.max_batch_tokens (padded
        prompt tokens) or whose states (past and present of a step) would not fit
        RunnerOptions.max_state_bytes."""
        width = max(len(p) for p in prompts)
        padded = len(prompts) * (width + width % 2)
        if self.max_batch_tokens and padded > self.max_batch_tokens:
            raise PipoUserError(f"{len(prompts)} prompts of up to {width} tokens are {padded:,} "
                                f"padded prompt tokens, over the {self.max_batch_tokens:,} of "
                                "RunnerOptions.max_batch_tokens; send fewer or shorter prompts "
                                "per request")
        if self.manifest is None or self.max_state_bytes is None:
            return
        slots = (width + 1) // 2 + steps  # past_pairs at the last step
        need = 2 * state_bytes(self.manifest.states, len(prompts), slots)
        if need > self.max_state_bytes:
            raise PipoUserError(f"{len(prompts)} prompts with {steps} steps need {need / 2**30:.1f}"
                                f" GiB of states, over the {self.max_state_bytes / 2**30:.1f} GiB "
                                "budget (RunnerOptions.max_state_bytes); send fewer or shorter "
                                "requests")

    def close(self) -> None:
        """Free the backend; later calls raise PipoUserError. Closing twice is allowed."""
        if self.runner is not None:
            self.runner.close()
        self.runner = None
