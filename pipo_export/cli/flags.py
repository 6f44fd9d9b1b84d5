"""Flag groups shared by several commands, and the argparse types they use.

Each command module adds its own flags (`add_arguments(parser)`) and calls the groups here for
the ones it shares with other commands; defaults come from the typed options they fill, passed
in by the command, so each default is written once. Importing this module needs no torch.
"""
from __future__ import annotations

import argparse

from pipo_graphs import SamplingParams
from pipo_graphs.dtypes import DType
from pipo_runtime.backends import Backend
from pipo_runtime.backends.base import RunnerOptions
from pipo_runtime.session import DEFAULT_MAX_STEPS

DTYPES = tuple(d.value for d in DType)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house error format: one line, exit 2 (argparse prints usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def ids(text: str) -> list[int]:
    """argparse type: "5,17,300" -> [5, 17, 300] (at least one id)."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids takes comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("--ids needs at least one token id")
    return values


def names(text: str) -> list[str]:
    """argparse type: "a, b,c" -> ["a", "b", "c"]."""
    return [t for t in text.replace(" ", "").split(",") if t]


def add_source_flags(p: argparse.ArgumentParser, name: str = "checkpoint",
                     help: str = "PIPO checkpoint folder, or a PEFT adapter folder with --base",
                     base_help: str = "the Qwen3.5 base folder of an adapter") -> None:
    """The folder a command reads (positional `name`, optional when adapters are given with
    --adapter), the base of an adapter (--base) and more adapters merged in order (--adapter A
    [--adapter B ...], after the positional folder when that is an adapter too)."""
    p.add_argument(name, nargs="?", default=None, help=help)
    p.add_argument("--base", default=None, help=base_help)
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="FOLDER",
                   help="PEFT adapter folder merged over --base; repeat to stack adapters, "
                        "merged in order (e.g. the SFT adapter, then the OPD adapter)")


def add_backend_flags(p: argparse.ArgumentParser,
                      backend_help: str = "default: onnxruntime",
                      defaults: RunnerOptions = RunnerOptions()) -> None:
    """--backend, and the ONNX Runtime session flags (--providers, --threads); read them back
    with `backend_from` and `providers_from`."""
    p.add_argument("--backend", choices=[b.value for b in Backend], default=None,
                   help=backend_help)
    p.add_argument("--providers", default=",".join(defaults.providers),
                   help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="ONNX Runtime intra-op threads")


def backend_from(ns: argparse.Namespace) -> Backend | None:
    return Backend(ns.backend) if ns.backend else None


def providers_from(ns: argparse.Namespace) -> list[str]:
    return ns.providers.split(",")


def add_generation_flags(p: argparse.ArgumentParser, threshold: float,
                         sampling: SamplingParams, seed: int) -> None:
    """Prompt, steps, stop, gate and sampling flags (defaults: the caller's typed options)."""
    p.add_argument("--ids", type=ids, action="append", default=[],
                   help="prompt token ids, e.g. 5,17,300 (repeat for a batch)")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (needs tokenizer.json in the folder; repeat for a batch)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="prefill + decode steps; each emits one pair (default "
                        f"{DEFAULT_MAX_STEPS} unless --max-new-tokens is given)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="stop after this many user tokens (export folders)")
    p.add_argument("--stop-token-ids", type=ids, default=(),
                   help="comma-separated ids that end a sequence, like EOS")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string: text is cut before it (export with a tokenizer; repeatable)")
    p.add_argument("--threshold", type=float, default=threshold,
                   help="confidence gate tau: <0 always keep token2, >=1 never "
                        f"(default {threshold:g})")
    add_sampling_flags(p, sampling)
    p.add_argument("--seed", type=int, default=seed)


def max_steps_from(ns: argparse.Namespace) -> int | None:
    """--max-steps, or its default when neither it nor --max-new-tokens is given."""
    if ns.max_steps is None and ns.max_new_tokens is None:
        return DEFAULT_MAX_STEPS
    return ns.max_steps


def add_sampling_flags(p: argparse.ArgumentParser, defaults: SamplingParams) -> None:
    """The SamplingParams fields as flags; read them back with `sampling_from`."""
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="0 = greedy" + (" (default)" if defaults.temperature == 0 else ""))
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--min-p", type=float, default=defaults.min_p)
    p.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty)
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)


def sampling_from(ns: argparse.Namespace) -> SamplingParams:
    """The sampling flags as validated SamplingParams (PipoUserError when out of range)."""
    sampling = SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                              min_p=ns.min_p, presence_penalty=ns.presence_penalty,
                              repetition_penalty=ns.repetition_penalty)
    sampling.validate()
    return sampling
