"""One sequence's bookkeeping, shared by PipoSession and the Engine (the one per-row logic):
what each emitted pair adds for the user, when the sequence ends, its random stream and its
text, streamed without ever retracting a character.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipo_graphs.contract import SKIPPED_CONFIDENCE
from pipo_graphs.semantics import SequenceOutput

from pipo_runtime.continuation import SequenceState
from pipo_runtime.requests import ModelFacts

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes of a character still arriving


@dataclass
class SequenceResult(SequenceOutput):
    text: str | None = None
    prefill_tokens: int = 0  # user tokens the prefill step emitted (1 or 2)
    prompt_tokens: int = 0  # tokens of the prompt, cached ones included (a continued
    # sequence's: its past's consumed + pending + new)
    cached_tokens: int = 0  # prompt tokens whose states came from saved states (not prefilled)
    state: SequenceState | None = None  # its final states (GenerationConfig.save_state)


class TextStream:
    """Incremental detokenization: push user tokens, get the text they complete.

    Decodes a short window of tokens (from the last point where the text was complete), never
    the whole sequence, and appends only characters that are complete (a window ending in
    U+FFFD waits for the rest of its bytes). Text that could be the head of a stop string, the
    last max(len(stop)) - 1 characters, is held back until it is ruled out, so a stop string
    that spans two steps never leaks. Emitted text is never retracted: the deltas add up to
    `text`, which is the decode of every token cut before the first stop string.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer, self.stops = tokenizer, tuple(stop_strings)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.start = self.read = 0  # window start; ids[:read] are in `text`
        self.text = ""  # complete characters so far (cut at a stop string once one is found)
        self.sent = 0  # characters of `text` emitted
        self.searched = 0  # `text` holds no stop string starting before this
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tokens: list[int], final: bool = False) -> str:
        """Add tokens (final: the sequence ended) -> the text delta to emit now."""
        if self.stopped:
            return ""
        self.ids.extend(tokens)
        if len(self.ids) > self.read or final:
            head = self._decode(self.ids[self.start:self.read])
            full = self._decode(self.ids[self.start:])
            if final or (len(full) > len(head) and not full.endswith(REPLACEMENT)):
                self.text += full[len(head):]
                # the next window starts at the last complete token: decoders that drop a
                # leading space (or join bytes) see the same context in both decodes
                self.start, self.read = self.read, len(self.ids)
        return self._emit(final)

    def _emit(self, final: bool) -> str:
        begin = max(0, self.searched - self.hold)
        cuts = [c for c in (self.text.find(s, begin) for s in self.stops) if c >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
        self.searched = len(self.text)
        end = len(self.text) if final or self.stopped else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta


class SequenceTracker:
    """One sequence (prompt + generation config + its random stream) as its pairs arrive.

    `accept(pair, confidence)` records a step and returns the user tokens and text it adds;
    `finish()` ends the sequence ("length" unless it ended otherwise) and returns the text
    held back. `uniform_key()` is (seed, seq, step) of the next step: a sequence's uniforms
    come from its own seed, seq and step count, never from its batch row.
    """

    def __init__(self, facts: ModelFacts, config, steps: int, seq: int, prompt: list[int],
                 tokenizer=None, out: SequenceResult | None = None, cached: int = 0):
        """prompt: the tokens to prefill; cached: tokens before them that saved states hold."""
        self.facts, self.config, self.steps, self.seq = facts, config, steps, seq
        self.prompt = prompt
        self.out = out if out is not None else SequenceResult()
        self.out.prompt_tokens, self.out.cached_tokens = cached + len(prompt), cached
        self.stop_ids = set(config.stop_token_ids)
        self.text = TextStream(tokenizer, config.stop_strings) if tokenizer is not None else None
        self.step = 0  # steps accepted (the prefill is step 0)

    @property
    def done(self) -> bool:
        return self.out.done

    def uniform_key(self) -> tuple[int, int, int]:
        return self.config.seed, self.seq, self.step

    def accept(self, pair, confidence: float) -> tuple[list[int], str]:
        """One step's pair [2] and confidence -> (user tokens it adds, text delta)."""
        out, config = self.out, self.config
        if self.step and config.threshold >= 1:
            # tau >= 1 never commits token2; alone, its batch skips the confidence head. In a
            # batch with a tau < 1 row the head ran for every row: report what alone reports
            confidence = SKIPPED_CONFIDENCE
        new = out.add_pair(pair, confidence, self.facts.pad_id, config.eos_ids(self.facts),
                           self.stop_ids)
        limit = config.max_new_tokens
        if limit is not None and len(out.tokens) >= limit:
            extra = len(out.tokens) - limit
            if extra:
                del out.tokens[limit:]
                new = new[:len(new) - extra]
            out.finish_reason = out.finish_reason or "length"
        if self.step == 0:
            out.prefill_tokens = len(out.tokens)
        self.step += 1
        delta = self._text(new, final=out.done)
        if self.step >= self.steps and not out.done:
            delta += self.finish()
        return new, delta

    def _text(self, new: list[int], final: bool) -> str:
        if self.text is None:
            return ""
        delta = self.text.push(new, final)
        if self.text.stopped:
            self.out.finish_reason = "stop"
        self.out.text = self.text.text
        return delta

    def finish(self, reason: str = "length") -> str:
        """End the sequence (keeps an earlier finish reason) -> the text still held back."""
        was_done = self.out.done
        self.out.finish_reason = self.out.finish_reason or reason
        return "" if was_done else self._text([], final=True)
