"""The `pipo-export` command line: one module per command, each with `command(ns) -> exit code`.

Flags become typed dataclasses in the command modules; nothing past them sees argparse. A command
module is imported only when its command runs, so `check` and `build` never import torch.

Error policy (the one place it is enforced): a PipoUserError (bad input the user can fix) prints
one line and exits 2, so does an OS error on a path (missing, no permission, a file where a
folder should be, full disk); Ctrl-C exits 130 and SIGTERM 143, both unwinding like Ctrl-C (temp
folders removed); anything else is a bug in pipo-export and keeps its traceback.
"""
from __future__ import annotations

import errno
import importlib
import signal
import sys
import threading

from pipo_graphs.errors import PipoUserError

COMPILER_PACKAGES = ("torch", "transformers", "peft", "safetensors", "onnxscript")
# OS errors on a path the user chose (errno -> the fix); any other OSError keeps its traceback
OS_FIXES = {
    errno.ENOSPC: "free space or choose another folder, and rerun",
    errno.EDQUOT: "free space or choose another folder, and rerun",
    errno.EACCES: "you may not read or write it: check its permissions or choose another path",
    errno.EPERM: "you may not read or write it: check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file is expected: check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symlink loop: check the path",
    errno.EIO: "the disk reported an I/O error: check the disk or copy the files elsewhere",
}
COMMANDS = ("inspect", "merge", "tiny", "export", "check", "build", "compare", "bench", "run",
            "eval")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs, so it unwinds like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from pipo_export.cli.parser import build_parser

    ns = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _command(ns)  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _command(ns)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(ns) -> int:
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
    except Terminated:
        print("pipo-export: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("pipo-export: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in OS_FIXES:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pipo-export: error: {where}{exc.strerror}; {OS_FIXES[exc.errno]}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
