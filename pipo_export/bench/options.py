"""Typed options of `pipo-export bench` (the CLI reads its defaults from here; no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

BENCH_SHAPES = ("tiny", "small", "qwen3.5-0.8b")  # --shape choices


@dataclass
class BenchOptions:
    shape: str = "tiny"
    layers: int | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 4096])
    new_tokens: int = 32
    repeats: int = 3
    threshold: float = 0.5  # the gated PIPO run
    threads: int = 0
    workdir: str = "build/bench"
    json_file: str | None = None
    plot_file: str | None = None
    rebuild: bool = False
    seed: int = 0
