"""Fuzz of export folders (tests/folder_fuzz.py) with a fixed seed: random edits, resealed, to
manifest fields, graph file names, external-data offsets/lengths/locations and the files table.
Every run is refused in one line or gives the unedited export's tokens; no crash, traceback or
open of a file outside the folder, in pipo_runtime and in the C++ runtime. (The 10,000-edit run:
`python tests/folder_fuzz.py EXPORT --edits 10000`.)"""
from __future__ import annotations

import pytest

from folder_fuzz import PIPO_RUN, fuzz

PYTHON_EDITS, CPP_EDITS = 150, 40  # about a minute together on the tiny export


def _check(report: dict, runtime: str) -> None:
    counts = report["counts"]
    assert report["bad"] == [], report["bad"][:5]
    assert counts.get(f"{runtime}: refused", 0) > report["edits"] // 3, counts
    assert counts.get(f"{runtime}: same tokens", 0) > 0, counts  # edits that change nothing run


def test_fuzz_python(trt_export, tmp_path):
    _check(fuzz(trt_export, PYTHON_EDITS, seed=21, runtimes=("python",), work=tmp_path),
           "python")


@pytest.mark.skipif(not PIPO_RUN.is_file(), reason="the C++ runtime is not built (make cpp)")
def test_fuzz_cpp(trt_export, tmp_path):
    _check(fuzz(trt_export, CPP_EDITS, seed=22, runtimes=("cpp",), work=tmp_path), "cpp")
