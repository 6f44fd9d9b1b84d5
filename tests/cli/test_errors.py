"""The CLI's error policy: user-fixable problems (including a full disk) are one line and exit 2;
a bug keeps its traceback."""
from __future__ import annotations

import errno
import os

import pytest

from pipo_export import cli
from pipo_export.cli import check


def _raising(exc):
    def command(ns):
        raise exc
    return command


def test_full_disk_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(check, "command", _raising(OSError(errno.ENOSPC, "No space left on device",
                                                           str(tmp_path / "weights.data"))))
    assert cli.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "weights.data" in err[0]


@pytest.mark.parametrize("code,fix", [(errno.EACCES, "permissions"), (errno.ENOENT, "check the path"),
                                      (errno.ENOTDIR, "is a file"), (errno.EISDIR, "folder"),
                                      (errno.EROFS, "read-only")])
def test_path_os_errors_name_path_and_cause(monkeypatch, capsys, tmp_path, code, fix):
    monkeypatch.setattr(check, "command", _raising(OSError(code, os.strerror(code),
                                                           str(tmp_path / "x"))))
    assert cli.main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "x") in err[0] and fix in err[0], err


def test_other_os_errors_are_bugs_and_keep_their_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(check, "command", _raising(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError):
        cli.main(["check", str(tmp_path)])


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--top-p", "inf"),
                                        ("--presence-penalty", "-inf"), ("--min-p", "nan"),
                                        ("--repetition-penalty", "inf"), ("--threshold", "nan")])
def test_nan_and_inf_sampling_values_are_refused(flag, value):
    """The values behind these run flags are checked before any backend runs."""
    from pipo_graphs import SamplingParams
    from pipo_graphs.errors import PipoUserError
    from pipo_runtime.session import GenerationConfig
    name = flag[2:].replace("-", "_")
    with pytest.raises(PipoUserError, match="finite"):
        if name == "threshold":
            GenerationConfig(max_steps=1, threshold=float(value)).steps()
        else:
            SamplingParams(**{name: float(value)}).validate()
