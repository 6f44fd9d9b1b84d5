"""Nothing left behind: SIGTERM unwinds like Ctrl-C, a rerun removes the temp folders of killed
runs (and only theirs), --force onto a file leaves no `.OUT.old`, output folders follow the
umask."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipo_export import cli

from conftest import TINY_REF

KILLED_RUN = """
import os, signal, sys
from pipo_export.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half-written").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_rerun_removes_temp_folders_of_killed_runs_only(tmp_path, capsys):
    out = tmp_path / "ck"
    for _ in range(2):  # two runs killed by SIGKILL mid-write: the second removes the first's
        proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out)])
        assert proc.returncode == -signal.SIGKILL
        assert len(_siblings(out)) == 1 and not out.exists()
    live = tmp_path / f".ck.tmp-{os.getpid()}-livework"  # a live process's (ours): kept
    live.mkdir()
    legacy = tmp_path / ".ck.tmp-x1y2z3"  # named before temp folders carried their PID
    legacy.mkdir()
    assert cli.main(["tiny", str(out)]) == 0
    assert _siblings(out) == [live.name] and (out / "config.json").is_file()


def test_sigterm_during_export_unwinds_and_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from pipo_export.cli import main; "
                             "sys.exit(main())", "export", str(TINY_REF), "-o", str(out),
                             "--no-validate"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _siblings(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert _siblings(out), "the export never created its temp folder"
    time.sleep(1.0)  # well inside the export
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "pipo-export: terminated (SIGTERM)"
    assert "Traceback" not in err
    assert _siblings(out) == [] and not out.exists()


def test_force_onto_a_file_leaves_no_old(tmp_path):
    out = tmp_path / "ck"
    out.write_text("a file where the folder goes")
    assert cli.main(["tiny", str(out), "--force"]) == 0
    assert out.is_dir() and _siblings(out) == []
    assert cli.main(["tiny", str(out), "--force"]) == 0  # and onto a folder
    assert out.is_dir() and _siblings(out) == []


def test_output_folder_follows_the_umask(tmp_path):
    for mask, mode in ((0o022, 0o755), (0o077, 0o700), (0o002, 0o775)):
        old = os.umask(mask)
        try:
            out = tmp_path / f"ck-{mask:o}"
            assert cli.main(["tiny", str(out)]) == 0
        finally:
            os.umask(old)
        assert out.stat().st_mode & 0o777 == mode, (oct(mask), oct(out.stat().st_mode))
