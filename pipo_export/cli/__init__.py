"""The `pipo-export` command line: one module per command, each with `command(ns) -> exit code`.

Flags become typed dataclasses in the command modules; nothing past them sees argparse. A command
module is imported only when its command runs, so `check` and `build` never import torch.

Error policy (the one place it is enforced): a PipoUserError (bad input the user can fix) prints
one line and exits 2, so does a full disk or a folder it may not write; Ctrl-C exits 130; anything else is a bug in pipo-export and keeps its
traceback.
"""
from __future__ import annotations

import importlib
import errno
import sys

from pipo_graphs.errors import PipoUserError

COMPILER_PACKAGES = ("torch", "transformers", "peft", "safetensors", "onnxscript")
COMMANDS = ("inspect", "merge", "tiny", "export", "check", "build", "compare", "bench", "run")


def main(argv: list[str] | None = None) -> int:
    from pipo_export.cli.parser import build_parser

    ns = build_parser().parse_args(argv)
    try:
        return importlib.import_module(f"pipo_export.cli.{ns.command}").command(ns)
    except PipoUserError as exc:
        print(f"pipo-export: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in COMPILER_PACKAGES:
            raise
        print(f"pipo-export: error: `{ns.command}` needs {exc.name}, which is not installed here "
              "(pip install -e . installs the compiler's dependencies; check and build run "
              "without them)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipo-export: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"pipo-export: error: {exc.strerror}{where}; free space or choose another folder "
              "and rerun", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
