"""The peers' own environments under build/ (default build/peers), created once and reused.

- ortgenai: venv ROOT/ortgenai; torch==2.13.0 installed first and pinned by a constraints file
  (any other torch pulls multi-GB CUDA wheels), then onnxruntime-genai and what its model
  builder imports to read a Hugging Face folder.
- llamacpp: venv ROOT/llamacpp with what vendor/llama.cpp/convert_hf_to_gguf.py imports; the
  llama-cpp-python sdist from PyPI (`pip download --no-binary :all:`) unpacked under
  ROOT/llamacpp/src, its vendored llama.cpp built with CMake (CPU, Release, static, native) into
  ROOT/llamacpp/build for llama-bench and llama-quantize.

Every step checks before it acts: a venv whose pinned modules import at the pinned versions, an
unpacked source tree, binaries built with the same flags (a stamp file) are left alone. Anything
that goes wrong raises PeerUnavailable with one line; tool output goes to a log file under ROOT.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers import PeerUnavailable

TORCH = "torch==2.13.0"  # the CPU wheel (the machine's pip find-links)
TRANSFORMERS = "transformers==5.23.0"
ORTGENAI_PACKAGES = ("onnxruntime-genai==0.18.0", TRANSFORMERS, "safetensors==0.8.0",
                     "onnx==1.23.2", "onnx_ir==1.1.0", "tqdm")
ORTGENAI_IMPORTS = {"torch": "2.13.0", "onnxruntime_genai": "0.18.0", "transformers": "5.23.0",
                    "onnxruntime": None, "onnx": None, "onnx_ir": None, "safetensors": None}
LLAMA_CPP_PYTHON = "0.3.36"
LLAMACPP_PACKAGES = (TRANSFORMERS, "safetensors==0.8.0", "sentencepiece", "numpy")
LLAMACPP_IMPORTS = {"torch": "2.13.0", "gguf": None, "transformers": "5.23.0",
                    "safetensors": None, "sentencepiece": None, "numpy": None}
# llama-bench times the peers bench; llama-perplexity measures Q4_K_M's KL against f16
# (benchmarks/README.md, Quality); llama-server is the serving bench's peer (serve_load.py)
LLAMA_TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-server")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF")
STAMP = "peer-build.json"


@dataclass
class SetupOptions:
    """Where and how the peers are installed."""

    root: Path = Path("build/peers")
    base_python: str = sys.executable  # the interpreter `python -m venv` runs with
    install: bool = True  # False: use what exists, skip a peer that is missing
    jobs: int = 2  # parallel compile jobs for llama.cpp


@dataclass
class PeerEnv:
    """A ready peer: its venv's python, versions, and (llama.cpp) source tree and binaries."""

    name: str
    python: Path
    versions: dict
    llama_dir: Path | None = None
    tools: dict[str, Path] = field(default_factory=dict)
    setup_s: float = 0.0


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def run_logged(cmd: list, logfile: Path, what: str) -> None:
    """Run a setup command, output appended to `logfile`; PeerUnavailable on failure."""
    cmd = [str(c) for c in cmd]
    log("+ " + " ".join(cmd))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        f.write("\n+ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise PeerUnavailable(f"{what}: {exc}") from None
    if proc.returncode != 0:
        raise PeerUnavailable(f"{what} failed (exit {proc.returncode}): {last_line(logfile)} "
                              f"(log {logfile})")


def last_line(logfile: Path) -> str:
    """The last non-empty line of a tool's log (usually the error)."""
    try:
        lines = [x.strip() for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def installed_versions(python: Path, modules: dict) -> dict:
    """{module: version, or None when it does not import} as `python` sees them."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        out[m] = str(getattr(importlib.import_module(m), '__version__', "
            "'unknown'))\n    except Exception:\n        out[m] = None\nprint(json.dumps(out))\n")
    try:
        proc = subprocess.run([str(python), "-c", code, *modules], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return {m: None for m in modules}
    return json.loads(proc.stdout) if proc.returncode == 0 else {m: None for m in modules}


def satisfied(found: dict, wanted: dict) -> bool:
    """Every module imports, at the wanted version where one is given (local tags ignored)."""
    return all(found.get(m) is not None and (v is None or found[m].split("+")[0] == v)
               for m, v in wanted.items())


def ensure_venv(venv: Path, opts: SetupOptions, wanted: dict, packages: list,
                logfile: Path) -> tuple[Path, dict]:
    """The venv with `wanted` importable: checked first, installed when allowed."""
    py = venv / "bin" / "python"
    found = installed_versions(py, wanted) if py.exists() else {}
    if satisfied(found, wanted):
        return py, found
    if not opts.install:
        missing = sorted(m for m in wanted if not found.get(m)) or sorted(wanted)
        raise PeerUnavailable(f"no usable venv at {venv} (missing {', '.join(missing)}) and "
                              "installing is off (--no-peer-install)")
    if not py.exists():
        run_logged([opts.base_python, "-m", "venv", venv], logfile, f"creating venv {venv}")
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")  # pins torch for this and any later install
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    if installed_versions(py, {"torch": None})["torch"] is None:
        run_logged(pip + [TORCH], logfile, f"installing {TORCH} into {venv}")
    run_logged(pip + ["-c", constraints, *packages], logfile, f"installing packages into {venv}")
    found = installed_versions(py, wanted)
    if not satisfied(found, wanted):
        raise PeerUnavailable(f"{venv} still lacks pinned packages after installing: {found}")
    return py, found


def ensure_ortgenai(opts: SetupOptions) -> PeerEnv:
    """onnxruntime-genai and its model builder's imports in ROOT/ortgenai."""
    t0 = time.perf_counter()
    root = Path(opts.root).resolve()
    py, found = ensure_venv(root / "ortgenai", opts, ORTGENAI_IMPORTS, list(ORTGENAI_PACKAGES),
                            root / "ortgenai-setup.log")
    return PeerEnv("onnxruntime-genai", py, found, setup_s=time.perf_counter() - t0)


def llamacpp_source(venv: Path, py: Path, opts: SetupOptions, logfile: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    src = venv / "src"
    tree = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    llama = tree / "vendor" / "llama.cpp"
    if (llama / "CMakeLists.txt").is_file() and (llama / "convert_hf_to_gguf.py").is_file():
        return llama
    if not opts.install:
        raise PeerUnavailable(f"no llama.cpp source at {llama} and installing is off")
    src.mkdir(parents=True, exist_ok=True)
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        run_logged([py, "-m", "pip", "download", "--disable-pip-version-check", "--no-binary",
                    ":all:", "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", src],
                   logfile, f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
    shutil.rmtree(tree, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise PeerUnavailable(f"cannot unpack {sdist}: {exc}") from None
    if not (llama / "CMakeLists.txt").is_file():
        raise PeerUnavailable(f"{sdist} has no vendor/llama.cpp")
    return llama


def llamacpp_build(llama: Path, build: Path, opts: SetupOptions, logfile: Path) -> dict:
    """llama-bench and llama-quantize, built unless a stamp says the same build exists."""
    stamp = build / STAMP
    want = {"source": str(llama), "flags": list(CMAKE_FLAGS)}
    bins = {t: build / "bin" / t for t in LLAMA_TARGETS}
    if stamp.is_file() and all(b.is_file() for b in bins.values()):
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in want} == want and set(LLAMA_TARGETS) <= set(
                done.get("targets", ())):
            return {**done, "built": False}
    if not opts.install:
        raise PeerUnavailable(f"no llama.cpp build at {build} and installing is off")
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise PeerUnavailable(f"building llama.cpp needs `{exe}` on PATH")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.perf_counter()
    log(f"building llama.cpp ({', '.join(LLAMA_TARGETS)}) with {opts.jobs} jobs: ~10 min on 2 "
        f"cores; log in {logfile}")
    run_logged(["cmake", "-S", llama, "-B", build, *generator, *CMAKE_FLAGS], logfile,
               "configuring llama.cpp")
    run_logged(["cmake", "--build", build, "--config", "Release", "-j", str(opts.jobs),
                "--target", *LLAMA_TARGETS], logfile, "building llama.cpp")
    done = {**want, "targets": list(LLAMA_TARGETS), "seconds": round(time.perf_counter() - t0, 1),
            "binaries": {t: str(b) for t, b in bins.items()}}
    stamp.write_text(json.dumps(done, indent=2))
    return {**done, "built": True}


def ensure_llamacpp(opts: SetupOptions) -> PeerEnv:
    """ROOT/llamacpp: the converter's venv, the llama.cpp source tree and its binaries."""
    t0 = time.perf_counter()
    root = Path(opts.root).resolve()
    venv, logfile = root / "llamacpp", root / "llamacpp-setup.log"
    py = venv / "bin" / "python"
    if not py.exists():  # the sdist is fetched with the venv's pip
        if not opts.install:
            raise PeerUnavailable(f"no venv at {venv} and installing is off (--no-peer-install)")
        run_logged([opts.base_python, "-m", "venv", venv], logfile, f"creating venv {venv}")
    llama = llamacpp_source(venv, py, opts, logfile)
    py, found = ensure_venv(venv, opts, LLAMACPP_IMPORTS,
                            [str(llama / "gguf-py"), *LLAMACPP_PACKAGES], logfile)
    build = llamacpp_build(llama, venv / "build", opts, logfile)
    tools = {t: venv / "build" / "bin" / t for t in LLAMA_TARGETS}
    versions = {**found, "llama.cpp": build_commit(venv / "build"),
                "llama-cpp-python": LLAMA_CPP_PYTHON}
    return PeerEnv("llama.cpp", py, versions, llama, tools, time.perf_counter() - t0)


def build_commit(build: Path) -> str | None:
    """The llama.cpp commit the binaries were built from (CMake's generated build-info)."""
    info = build / "common" / "build-info.cpp"
    if info.is_file():
        found = re.search(r'LLAMA_COMMIT = "([^"]+)"', info.read_text())
        return found.group(1) if found else None
    return None


ENSURE = {"ortgenai": ensure_ortgenai, "llamacpp": ensure_llamacpp}
