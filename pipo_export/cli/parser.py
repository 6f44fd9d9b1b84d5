"""The `pipo-export` argument parser: the table of commands, nothing else.

Every command is one module `pipo_export.cli.<name>` with

    add_arguments(parser: argparse.ArgumentParser) -> None   its flags (shared groups: cli.flags)
    command(args: argparse.Namespace) -> int                  runs it; returns the exit code

and one line in COMMANDS below. Only the module of the command being run is imported (its top
level imports no torch: heavy imports go inside `command`), so `pipo-export --help` imports no
command module, and no command module imports another.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import ModuleType

from pipo_export.cli.flags import OneLineParser

DESCRIPTION = "Deployment compiler for PIPO (Pair-In, Pair-Out) language models"


@dataclass(frozen=True)
class Command:
    module: str  # the module with add_arguments(parser) and command(args)
    help: str  # one line in `pipo-export --help`


COMMANDS = {
    "inspect": Command("pipo_export.cli.inspect", "show what a PIPO checkpoint folder holds"),
    "merge": Command("pipo_export.cli.merge", "merge a PEFT LoRA adapter into its Qwen3.5 base "
                                              "(writes a PIPO checkpoint folder)"),
    "tiny": Command("pipo_export.cli.tiny", "write a built-in PIPO checkpoint with random "
                                            "weights"),
    "export": Command("pipo_export.cli.export", "compile a checkpoint into prefill/decode ONNX "
                                                "graphs"),
    "check": Command("pipo_export.cli.check", "verify an export folder (checker, checksums, "
                                              "dims, lint)"),
    "build": Command("pipo_export.cli.build", "build TensorRT engines from a --target tensorrt "
                                              "export (needs TensorRT and an NVIDIA GPU)"),
    "compare": Command("pipo_export.cli.compare", "run the same prompts and random numbers on "
                                                  "several backends and compare them step by "
                                                  "step"),
    "bench": Command("pipo_export.cli.bench", "benchmark PIPO against regular decoding and "
                                              "transformers eager on a built-in shape (random "
                                              "weights)"),
    "run": Command("pipo_export.cli.run", "generate from a checkpoint (torch) or an export"),
    "eval": Command("pipo_export.cli.eval", "score a text teacher forced through an export: "
                                            "perplexity, KL against a reference, the gate"),
    "serve": Command("pipo_export.cli.serve", "serve an export over OpenAI's HTTP API "
                                              "(pip install 'pipo-runtime[serve]')"),
}


def command_module(name: str) -> ModuleType:
    """The module of command `name` (imported now)."""
    return importlib.import_module(COMMANDS[name].module)


def chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first argument that is not a flag: the
    top-level parser has no flag that takes a value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every command listed (with its help line), the flags of the one
    `argv` names added by its module."""
    parser = OneLineParser(prog="pipo-export", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    name = chosen(argv)
    for cmd, entry in COMMANDS.items():
        p = sub.add_parser(cmd, help=entry.help, description=entry.help)
        if cmd == name:
            command_module(cmd).add_arguments(p)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv).parse_args(argv)
