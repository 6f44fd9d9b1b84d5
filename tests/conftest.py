"""Shared fixtures: the copied reference checkpoint and tiny checkpoints in every layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
TINY_REF = DATA / "pipo-tiny-ref"


@pytest.fixture(scope="session")
def tiny_ref() -> Path:
    return TINY_REF


@pytest.fixture(scope="session")
def expected() -> dict:
    return dict(np.load(TINY_REF / "expected.npz"))


@pytest.fixture(scope="session")
def ref_model():
    from pipo_export import load_checkpoint
    return load_checkpoint(TINY_REF)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `pipo-export ARGS` in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from pipo_export.cli import main; "
                           "sys.exit(main())", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipo-export {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def run_json(*args: str) -> dict:
    return json.loads(run_cli(*args, "--json").stdout)


@pytest.fixture(scope="session")
def trace_cache(tmp_path_factory) -> Path:
    """Traced pieces shared by the session's exports (the first export of an architecture
    traces; the others reuse)."""
    return tmp_path_factory.mktemp("trace-cache")


def export_folder(out: Path, checkpoint, cache: Path | None = None, **kw) -> Path:
    from pipo_export.export.pipeline import export
    from pipo_export.export.options import ExportOptions
    from pipo_graphs.contract import Target
    export(ExportOptions(checkpoint=str(checkpoint), out=str(out),
                         target=Target(kw.pop("target", "onnxruntime")),
                         trace_cache=str(cache) if cache else None, **kw))
    return out


def _export(tmp_path_factory, name, checkpoint, **kw):
    cache = tmp_path_factory.getbasetemp() / "trace-cache"
    return export_folder(tmp_path_factory.mktemp("exports") / name, checkpoint, cache, **kw)


@pytest.fixture(scope="session")
def ort_export(tmp_path_factory):
    """pipo-tiny-ref, onnxruntime target."""
    return _export(tmp_path_factory, "ref-ort", TINY_REF)


@pytest.fixture(scope="session")
def trt_export(tmp_path_factory):
    """pipo-tiny-ref, tensorrt target (standard ops only)."""
    return _export(tmp_path_factory, "ref-trt", TINY_REF, target="tensorrt")


@pytest.fixture(scope="session")
def regular_export(tmp_path_factory):
    """pipo-tiny-ref's backbone as a plain causal LM (`export --mode regular`)."""
    from pipo_graphs.contract import Mode
    return _export(tmp_path_factory, "ref-regular", TINY_REF, mode=Mode.REGULAR)


@pytest.fixture(scope="session")
def layout_checkpoint(tmp_path_factory):
    from pipo_export.model.synthetic import TinyLayout, write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "mm-linear-untied",
                                 TinyLayout(multimodal=True, shards=2, tied=False,
                                            compressor="linear"), seed=3)


@pytest.fixture(scope="session")
def layout_export(tmp_path_factory, layout_checkpoint):
    """The other graph-relevant layout: linear compressor, untied lm_head (multimodal, sharded)."""
    return _export(tmp_path_factory, "layout-ort", layout_checkpoint)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow but run in CI (e.g. the Ray Serve cluster)")
