"""`check` and `build --help` run where torch cannot be imported (issue 12): a child process in
which `import torch` (and transformers) raises ImportError."""
from __future__ import annotations

import subprocess
import sys

BLOCK = ("import sys\n"
         "sys.modules['torch'] = None\n"  # makes `import torch` raise ImportError
         "sys.modules['transformers'] = None\n"
         "from pipo_export.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def _cli(*args):
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True)


def test_check_and_build_help_without_torch(ort_export):
    proc = _cli("check", str(ort_export))
    assert proc.returncode == 0, proc.stderr
    assert "export OK" in proc.stdout
    proc = _cli("build", "--help")
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr
    proc = _cli("export", "--help")  # the parser alone needs no torch either
    assert proc.returncode == 0, proc.stderr
    blocked = _cli("inspect", str(ort_export))  # a torch command says so in one line
    assert blocked.returncode == 2 and "needs torch" in blocked.stderr
    assert len(blocked.stderr.strip().splitlines()) == 1
