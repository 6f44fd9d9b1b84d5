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
