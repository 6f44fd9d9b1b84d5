"""The server's settings: one dataclass, and the flags that fill it (`add_arguments`, shared by
`python -m pipo_runtime.serve` and `pipo-export serve`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

from pipo_graphs.errors import PipoUserError
from pipo_runtime.backends.base import RunnerOptions

FALLBACK_MAX_TOKENS = 1024  # a request without max_tokens, when nothing else sets a default


class GenerationDefaults(str, Enum):
    """--generation-config: where request defaults come from."""

    AUTO = "auto"  # the export's generation_config.json (copied from the checkpoint), if any
    NONE = "none"  # OpenAI's defaults only


@dataclass
class ServeConfig:
    out: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 2048
    cache_bytes: int = 0  # the engine's prefix cache (contract 1.1); 0 = off
    threads: int = RunnerOptions.threads
    providers: tuple[str, ...] = RunnerOptions.providers
    served_model_name: str | None = None  # default: the export folder's name
    api_key: str | None = None
    default_max_tokens: int | None = None
    generation_config: GenerationDefaults = GenerationDefaults.AUTO
    drain_timeout: float = 30.0
    ray: bool = False
    replicas: int = 1

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_prefill_tokens", "replicas"):
            if getattr(self, name) < 1:
                raise PipoUserError(f"--{name.replace('_', '-')} must be >= 1, got "
                                    f"{getattr(self, name)}")
        if self.cache_bytes < 0:
            raise PipoUserError(f"--cache-bytes must be >= 0 (0 = no prefix cache), got "
                                f"{self.cache_bytes}")
        if not 0 < self.port < 65536:
            raise PipoUserError(f"--port must be in [1, 65535], got {self.port}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise PipoUserError(f"--default-max-tokens must be >= 1, got "
                                f"{self.default_max_tokens}")
        if not self.drain_timeout >= 0:
            raise PipoUserError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
        self.generation_config = GenerationDefaults(self.generation_config)

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.out).resolve().name

    @property
    def max_ongoing(self) -> int:
        """Requests one engine holds: running rows plus the queue (Ray's max_ongoing_requests)."""
        return self.max_batch + self.max_queue


DEFAULTS = ServeConfig(out="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's flags (defaults from ServeConfig)."""
    d = DEFAULTS
    p.add_argument("out", help="export folder to serve")
    p.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host})")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="rows the engine decodes together")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests that may wait for a row; beyond it, 429")
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="prompt tokens prefilled per engine tick (contract 1.1 exports: a "
                        "longer prompt is prefilled in chunks of this size between decode steps)")
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes,
                   help="bytes of finished requests' states kept in a prefix cache (LRU): a "
                        "prompt that extends a cached conversation prefills only its new tokens "
                        "(contract 1.1 exports; default 0 = off)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--providers", default=",".join(d.providers),
                   help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the folder's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="tokens generated when a request gives no max_tokens (default: the "
                        "export's generation_config max_new_tokens, else "
                        f"{FALLBACK_MAX_TOKENS}; always capped by the context)")
    p.add_argument("--generation-config", choices=[g.value for g in GenerationDefaults],
                   default=d.generation_config.value,
                   help="auto: sampling defaults from the export's generation_config.json; "
                        "none: OpenAI's defaults")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, seconds in-flight requests get to finish")
    p.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve deployment (pip install 'ray[serve]')")
    p.add_argument("--replicas", type=int, default=d.replicas,
                   help="Ray Serve replicas, one engine each (with --ray)")


def config_from_args(ns: argparse.Namespace) -> ServeConfig:
    names = {f.name for f in fields(ServeConfig)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values["providers"] = tuple(p for p in ns.providers.split(",") if p)
    return ServeConfig(**values)
