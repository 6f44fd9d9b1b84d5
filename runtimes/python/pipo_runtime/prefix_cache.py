"""A prefix cache over saved sequence states (graph contract 1.1), bounded in bytes, LRU.

Entries are SequenceStates (pipo_runtime.continuation) keyed by the token history they stand
for (`state.history`: what prefilling from scratch would read, PAD included as the model saw
it). A request whose tokens start with a cached history continues that state with the rest:

    hit = cache.lookup(tokens)
    if hit is not None:
        session.generate([tokens[len(hit.history):]], config, past=hit)   # prefills
        # hit.pending + the rest only, and gives the tokens of prefilling `tokens` whole

`lookup` returns the longest such entry. An entry whose pending tuple is empty (a chunk of a
prompt) needs at least one more token, since a prefill reads at least one. An odd prompt's
state holds its PAD: it serves only requests that carry that PAD (a conversation's raw history).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from pipo_graphs.errors import PipoUserError

from pipo_runtime.continuation import SequenceState

KEY_BYTES_PER_TOKEN = 8  # what a key costs beside its states, for the byte bound


@dataclass(frozen=True)
class PrefixCacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class PrefixCache:
    """Saved states keyed by token prefix (see the module doc); thread-safe."""

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise PipoUserError(f"the prefix cache size must be a number of bytes >= 0, got "
                                f"{max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], SequenceState] = OrderedDict()
        self._lengths: dict[int, int] = {}  # key length -> entries of that length
        self._bytes = self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    @staticmethod
    def cost(state: SequenceState) -> int:
        """Bytes an entry counts against the bound: its states and its key."""
        return state.nbytes + KEY_BYTES_PER_TOKEN * len(state.history)

    def put(self, state: SequenceState) -> bool:
        """Cache `state` under its history (replacing an entry of the same history), evicting
        least recently used entries until it fits; False when it alone exceeds the bound."""
        cost = self.cost(state)
        if cost > self.max_bytes:
            return False
        key = state.history
        with self._lock:
            if key in self._entries:
                self._remove(key)
            while self._bytes + cost > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = state
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self._bytes += cost
        return True

    def lookup(self, tokens) -> SequenceState | None:
        """The entry with the longest history that `tokens` start with (and that leaves a
        token to prefill), marked most recently used; None on a miss. Counts hits and misses."""
        tokens = tuple(int(t) for t in tokens)
        with self._lock:
            for n in sorted(self._lengths, reverse=True):
                if n > len(tokens):
                    continue
                state = self._entries.get(tokens[:n])
                if state is not None and (state.pending or n < len(tokens)):
                    self._entries.move_to_end(tokens[:n])
                    self.hits += 1
                    return state
            self.misses += 1
            return None

    def _remove(self, key: tuple[int, ...]) -> None:
        state = self._entries.pop(key)
        self._bytes -= self.cost(state)
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._entries), self._bytes, self.max_bytes, self.hits,
                                    self.misses, self.evictions)
