"""`pipo-export serve OUT`: the OpenAI-compatible server of pipo_runtime.serve (torch-free)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from pipo_runtime.serve.config import add_arguments as serve_arguments
    serve_arguments(parser)


def command(ns) -> int:
    from pipo_runtime.serve.__main__ import serve
    from pipo_runtime.serve.config import config_from_args
    return serve(config_from_args(ns))
