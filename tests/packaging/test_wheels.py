"""Installed as users install it (issue 18): the three wheels, non-editable, in fresh venvs.

1. `pip wheel --no-deps` builds pipo-graphs, pipo-runtime and pipo-export from a copy of their
   sources (the checkout gets no build/ or egg-info); each wheel holds every subpackage of its
   own import package and nothing of the others'.
2. A fresh venv gets torch==2.13.0 (pinned, first: the CPU build on local disk), then the three
   wheels; `pipo-export --help`, `tiny`, `inspect`, `export` and `run` work from it.
3. A second fresh venv gets pipo-graphs and pipo-runtime[text] only: torch is not importable
   there, and PipoSession generates from the export of step 2 the tokens `run` printed.

Slow (two venvs, one tiny export: a few minutes); pip's cache is reused.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# distribution -> (source folder, import package, files copied to build it)
DISTS = {
    "pipo_graphs": (ROOT / "graphs", "pipo_graphs", ("pyproject.toml", "pipo_graphs")),
    "pipo_runtime": (ROOT / "runtimes/python", "pipo_runtime", ("pyproject.toml", "pipo_runtime")),
    "pipo_export": (ROOT, "pipo_export", ("pyproject.toml", "setup.cfg", "README.md",
                                          "pipo_export")),
}
TORCH = "torch==2.13.0"  # pinned as the Makefile pins it: another torch pulls CUDA wheels
PROMPT = [5, 17, 300, 42, 7]


def _env() -> dict:
    """The environment of the venvs' processes: nothing from this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, PYTHONNOUSERSITE="1")


def _run(*args, cwd: Path, timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _subpackages(source: Path, package: str) -> set[str]:
    """Every folder with an __init__.py under source/package, as a wheel path."""
    return {str(p.parent.relative_to(source)) for p in (source / package).rglob("__init__.py")
            if "__pycache__" not in p.parts}


def _venv(path: Path, cwd: Path) -> Path:
    _run(sys.executable, "-m", "venv", path, cwd=cwd)
    return path / "bin"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheels")
    out = tmp / "dist"
    for dist, (source, _, files) in DISTS.items():
        copy = tmp / "src" / dist
        for name in files:
            src = source / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                copy.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, copy / name)
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, copy, cwd=tmp)
    found = {dist: next(out.glob(f"{dist}-*.whl")) for dist in DISTS}
    assert len(list(out.glob("*.whl"))) == len(DISTS)
    return found


def test_wheels_hold_every_subpackage_and_only_their_own(wheels):
    for dist, (source, package, _) in DISTS.items():
        names = zipfile.ZipFile(wheels[dist]).namelist()
        dirs = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
        assert dirs == _subpackages(source, package), dist
        code = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        assert code == {package}, f"{dist} ships {sorted(code)}"
    graphs = zipfile.ZipFile(wheels["pipo_graphs"]).namelist()
    assert {"pipo_graphs/manifest.schema.json", "pipo_graphs/engine_manifest.schema.json"} \
        <= set(graphs)
    meta = zipfile.ZipFile(wheels["pipo_export"]).read(
        next(n for n in zipfile.ZipFile(wheels["pipo_export"]).namelist()
             if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("pipo-graphs" in r for r in requires) and any("pipo-runtime" in r for r in requires)


@pytest.fixture(scope="module")
def installed(wheels, tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv with torch (pinned) and the three wheels, non-editable; -> (bin, work)."""
    work = tmp_path_factory.mktemp("installed")
    bin_ = _venv(work / "venv", work)
    _run(bin_ / "python", "-m", "pip", "install", "-q", TORCH, cwd=work)
    _run(bin_ / "python", "-m", "pip", "install", "-q", TORCH, *wheels.values(), cwd=work)
    return bin_, work


def test_installed_compiler_runs_every_step(installed):
    bin_, work = installed
    where = json.loads(_run(bin_ / "python", "-c", "import json, pipo_export, pipo_graphs, "
                            "pipo_runtime, torch; print(json.dumps([pipo_export.__file__, "
                            "pipo_graphs.__file__, pipo_runtime.__file__, torch.__version__]))",
                            cwd=work).stdout)
    site = str(work / "venv")
    assert all(p.startswith(site) for p in where[:3]), where  # the wheels, not this checkout
    assert where[3].startswith("2.13.0")
    cli = bin_ / "pipo-export"
    assert "export" in _run(cli, "--help", cwd=work).stdout
    _run(cli, "tiny", "ckpt", cwd=work)
    assert "PIPO checkpoint" in _run(cli, "inspect", "ckpt", cwd=work).stdout
    _run(cli, "export", "ckpt", "-o", "export", cwd=work)
    assert "export OK" in _run(cli, "check", "export", cwd=work).stdout
    run = json.loads(_run(cli, "run", "export", "--ids", ",".join(map(str, PROMPT)),
                          "--max-steps", "6", "--json", cwd=work).stdout)
    (work / "tokens.json").write_text(json.dumps(run["tokens"]))


GENERATE = """
import json, sys
from pipo_runtime import GenerationConfig, PipoSession
session = PipoSession.load(sys.argv[1])
result = session.generate([json.loads(sys.argv[2])], GenerationConfig(max_steps=6))
print(json.dumps(result.sequences[0].tokens))
"""


def test_torch_free_runtime_generates_from_the_export(wheels, installed, tmp_path):
    _, work = installed
    if not (work / "tokens.json").exists():
        pytest.skip("the installed compiler did not export (see the test before)")
    bin_ = _venv(tmp_path / "venv", tmp_path)
    _run(bin_ / "python", "-m", "pip", "install", "-q", wheels["pipo_graphs"],
         f"{wheels['pipo_runtime']}[text]", cwd=tmp_path)
    missing = _run(bin_ / "python", "-c", "import importlib.util as u; print([m for m in "
                   "('torch', 'transformers', 'pipo_export', 'onnx') if u.find_spec(m)])",
                   cwd=tmp_path).stdout.strip()
    assert missing == "[]"
    assert _run(bin_ / "python", "-c", "import tokenizers", cwd=tmp_path).returncode == 0
    tokens = json.loads(_run(bin_ / "python", "-c", GENERATE, work / "export",
                             json.dumps(PROMPT), cwd=tmp_path).stdout)
    assert tokens == json.loads((work / "tokens.json").read_text())
    assert tokens
