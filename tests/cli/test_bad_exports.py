"""The bad-export table: an export folder edited and resealed (the seal is a checksum, so an
attacker reseals) to read outside the folder, read unsealed files, point weights anywhere or
swap graphs. Each case runs through `pipo-export run`, the C++ `pipo-run` and `pipo-export
check`: one line, exit 2, no traceback, and no file outside the folder opened (inotify on the
outside folder, which sees every process)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from pipo_export import cli

from export_edits import (DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, edit_external, edit_manifest,
                          external_tensors, read_manifest, reseal, tiny_tokenizer_json,
                          write_file)
from fs_watch import OpenWatch

PIPO_RUN = Path(__file__).resolve().parents[2] / "build" / "cpp" / "pipo-run"
RUNNERS = ("python", "cpp", "check")
ARGS = ["--ids", "5,17", "--max-steps", "2"]
PROMPT = ["--prompt", "w5 w17", "--max-steps", "2"]  # ids 5, 17 through tiny_tokenizer_json
TEXT_CASES = ("tokenizer.json not sealed", "tokenizer.json broken, sealed")


def _graph_file(graph: str, name_of):
    """graphs[graph].file renamed to name_of(folder, outside) (an identical copy of the graph
    lies outside), listed in the files table with that copy's checksum."""
    def edit(f: Path, out: Path):
        def change(m):
            old = m["graphs"][graph]["file"]
            m["graphs"][graph]["file"] = name_of(f, out)
            m["files"][name_of(f, out)] = m["files"][old]
        edit_manifest(f, change)
    return edit


def _files_entry(name_of):
    def edit(f: Path, out: Path):
        edit_manifest(f, lambda m: m["files"].update({name_of(f, out): m["files"][WEIGHTS_FILE]}))
    return edit


def _symlink_out(name: str):
    """folder/name becomes a symlink to an identical copy outside (the checksum still holds)."""
    def edit(f: Path, out: Path):
        shutil.copy(f / name, out / name)  # replaces the plain copy _make put there
        (f / name).unlink()
        (f / name).symlink_to(out / name)
    return edit


def _drop_file(name: str):
    return lambda f, out: edit_manifest(f, lambda m: m["files"].pop(name))


def _external(**entries):
    def edit(f: Path, out: Path):
        values = {k: (v(f) if callable(v) else v) for k, v in entries.items()}
        edit_external(f, PREFILL_FILE, 3, **values)
    return edit


def _both_graphs(index: int = 3, **entries):
    """The same tensor's external data edited in both graphs (so they agree)."""
    def edit(f: Path, out: Path):
        model = onnx.load(str(f / PREFILL_FILE), load_external_data=False)
        name = external_tensors(model)[index].name
        for graph in (PREFILL_FILE, DECODE_FILE):
            model = onnx.load(str(f / graph), load_external_data=False)
            at = [t.name for t in external_tensors(model)].index(name)
            edit_external(f, graph, at, **entries)
    return edit


def _size(f: Path) -> str:
    return str((f / WEIGHTS_FILE).stat().st_size)


def _length_plus(f: Path) -> str:
    model = onnx.load(str(f / PREFILL_FILE), load_external_data=False)
    kv = {e.key: e.value for e in external_tensors(model)[3].external_data}
    return str(int(kv["length"]) + 4)


def _swap(f: Path, out: Path):
    def change(m):
        g = m["graphs"]
        g["prefill_compress"]["file"], g["decode_unfold"]["file"] = DECODE_FILE, PREFILL_FILE
    edit_manifest(f, change)


def _duplicate(f: Path, out: Path):
    edit_manifest(f, lambda m: m["graphs"]["decode_unfold"].update(file=PREFILL_FILE))


def _nested(f: Path, out: Path):
    from pipo_graphs.seal import write_sealed
    write_sealed(f / "manifest.json", "[" * 100_000 + "]" * 100_000)


def _unknown_op(f: Path, out: Path):
    """A well-formed graph ONNX Runtime refuses (an op it does not know), resealed."""
    model = onnx.load(str(f / PREFILL_FILE), load_external_data=False)
    model.graph.node[0].op_type = "NoSuchOp"
    (f / PREFILL_FILE).write_bytes(model.SerializeToString())
    reseal(f, read_manifest(f), [PREFILL_FILE])


def _manifest_symlink(f: Path, out: Path):
    shutil.copy(f / "manifest.json", out / "manifest.json")
    (f / "manifest.json").unlink()
    (f / "manifest.json").symlink_to(out / "manifest.json")


ALL, RUNTIMES = RUNNERS, ("python", "cpp")
CASES = {
    # name: (edit(folder, outside), text every refusal holds, runners)
    "graph path ../outside": (_graph_file("prefill_compress",
                                          lambda f, o: f"../outside/{PREFILL_FILE}"),
                              "plain relative path", ALL),
    "graph path absolute": (_graph_file("decode_unfold", lambda f, o: str(o / DECODE_FILE)),
                            "plain relative path", ALL),
    "files entry ../outside": (_files_entry(lambda f, o: "../outside/w.data"),
                               "plain relative path", ALL),
    "files entry absolute": (_files_entry(lambda f, o: str(o / "w.data")),
                             "plain relative path", ALL),
    "weights a symlink outside": (_symlink_out(WEIGHTS_FILE), "outside the export folder", ALL),
    "graph a symlink outside": (_symlink_out(DECODE_FILE), "outside the export folder", ALL),
    "manifest a symlink outside": (_manifest_symlink, "outside the export folder", ALL),
    "files table without weights": (_drop_file(WEIGHTS_FILE), "does not list the weights", ALL),
    "files table without a graph": (_drop_file(DECODE_FILE), "does not list the graph", ALL),
    "external offset negative": (_external(offset="-40960"), "offset", ALL),
    "external offset with a sign": (_external(offset="+0"), "offset", ALL),
    "external offset = file size": (_external(offset=_size), "points outside", ALL),
    "external offset 2^64-1": (_external(offset=str((1 << 64) - 1)), "offset", ALL),
    "external offset 2^64": (_external(offset=str(1 << 64)), "offset", ALL),
    "external offset -40960 on the embedding, both graphs": (
        _both_graphs(0, offset="-40960"), "offset", ALL),  # stoull wrapped it; + length wrapped
    "external length + 4": (_external(length=_length_plus), "wrong length", ALL),
    "external offset of another tensor": (_external(offset="0"), "the other graph reads it",
                                          ALL),
    "external offset of another tensor, both graphs": (_both_graphs(offset="0"), "overlap",
                                                       ALL),
    "external length negative": (_external(length="-4"), "length", ALL),
    "external location ../outside": (_external(location="../outside/w.data"),
                                     "plain relative path", ALL),
    "external location absolute": (_external(location="/etc/passwd"), "plain relative path",
                                   ALL),
    "external location another file": (_external(location="manifest.json"),
                                       "not the manifest's weights file", ALL),
    "graphs swapped": (_swap, "differ from the manifest", ALL),
    "graphs duplicated": (_duplicate, "both graphs name", ALL),
    "manifest nested deeply": (_nested, "nesting too deep", ALL),
    "graph not ONNX, resealed": (lambda f, o: write_file(f, PREFILL_FILE, b"\x0a\xff\xff"),
                                 "not a valid ONNX model", ALL),
    "graph ORT cannot load": (_unknown_op, "cannot load", RUNTIMES),
    "tokenizer.json not sealed": (lambda f, o: write_file(f, "tokenizer.json",
                                                          tiny_tokenizer_json().encode(), False),
                                  "tokenizer.json", ("python",)),
    "tokenizer.json broken, sealed": (lambda f, o: write_file(f, "tokenizer.json", b"{}"),
                                      "not a valid tokenizer.json", ("python",)),
}


@pytest.fixture(scope="module")
def pristine(trt_export) -> Path:
    return trt_export


def _make(case: str, pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder, outside = tmp_path / "export", tmp_path / "outside"
    shutil.copytree(pristine, folder)
    outside.mkdir()
    for name in (PREFILL_FILE, DECODE_FILE):
        shutil.copy(pristine / name, outside / name)
    shutil.copy(pristine / WEIGHTS_FILE, outside / "w.data")
    CASES[case][0](folder, outside)
    return folder, outside


def _refusal(case: str, runner: str, folder: Path, capsys) -> tuple[int, str]:
    if runner == "cpp":
        if not PIPO_RUN.is_file():
            pytest.skip("the C++ runtime is not built (make cpp)")
        proc = subprocess.run([str(PIPO_RUN), str(folder), *ARGS], capture_output=True,
                              text=True, timeout=120)
        return proc.returncode, proc.stderr
    args = PROMPT if case in TEXT_CASES else ARGS
    argv = ["check", str(folder)] if runner == "check" else ["run", str(folder), *args]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_export_is_refused_in_one_line(case, runner, pristine, tmp_path, capsys):
    _, match, runners = CASES[case]
    if runner not in runners:
        pytest.skip(f"{runner} does not read what this case edits")
    root = tmp_path / case.replace(" ", "_").replace("/", "_")
    root.mkdir()
    folder, outside = _make(case, pristine, root)
    with OpenWatch(outside) as watch:
        code, err = _refusal(case, runner, folder, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (case, runner, code, err)
    assert len(lines) == 1 and "Traceback" not in err, (case, runner, err)
    assert match.lower() in lines[0].lower(), (case, runner, lines[0])
    assert watch.opened() == [], (case, runner, "opened outside the folder")


def _hub_layout(pristine: Path, root: Path, inside: bool) -> Path:
    """Every file a symlink into blobs/ (a Hugging Face cache): blobs/ inside the folder, or
    the hub's own models--X/snapshots/REV -> models--X/blobs."""
    repo = root / "models--pipo--tiny"
    folder = root / "export" if inside else repo / "snapshots" / "0123abc"
    blobs = folder / "blobs" if inside else repo / "blobs"
    folder.mkdir(parents=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(pristine.iterdir()):
        blob = blobs / f.name.replace(".", "_")
        shutil.copy(f, blob)
        (folder / f.name).symlink_to(os.path.relpath(blob, folder))
    return folder


@pytest.mark.parametrize("inside", [True, False], ids=["blobs-inside", "hub-snapshot"])
def test_hugging_face_cache_layout_loads_and_checks(inside, pristine, tmp_path, capsys):
    folder = _hub_layout(pristine, tmp_path, inside)
    assert cli.main(["check", str(folder)]) == 0
    assert "export OK" in capsys.readouterr().out
    want = _run_tokens(pristine, capsys)
    assert _run_tokens(folder, capsys) == want
    if PIPO_RUN.is_file():
        proc = subprocess.run([str(PIPO_RUN), str(folder), *ARGS, "--json"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert __import__("json").loads(proc.stdout)["tokens"] == want


def _run_tokens(folder: Path, capsys, args=ARGS) -> list[int]:
    import json
    capsys.readouterr()
    assert cli.main(["run", str(folder), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_sealed_tokenizer_is_used(pristine, tmp_path, capsys):
    """The same tokenizer.json, listed in the files table: the prompt's text is used."""
    folder = tmp_path / "export"
    shutil.copytree(pristine, folder)
    write_file(folder, "tokenizer.json", tiny_tokenizer_json().encode())
    assert _run_tokens(folder, capsys, PROMPT) == \
        _run_tokens(pristine, capsys)


def test_torch_backend_runs_only_the_source_it_exported(pristine, tmp_path, capsys):
    """The torch backend reruns the export's source checkpoint: it must hold the files the
    export hashed (manifest export.source_files). A copy runs; a changed, added or removed
    file is refused in one line."""
    from conftest import TINY_REF
    ck, folder = tmp_path / "ck", tmp_path / "export"
    shutil.copytree(TINY_REF, ck)
    shutil.copytree(pristine, folder)
    edit_manifest(folder, lambda m: m["export"].update(source=str(ck)))
    torch_args = [*ARGS, "--backend", "torch"]
    assert _run_tokens(folder, capsys, torch_args) == _run_tokens(pristine, capsys)
    changes = {"config.json changed": lambda: (ck / "config.json").write_text(
                   (ck / "config.json").read_text() + " "),
               "extra.safetensors is new": lambda: (ck / "extra.safetensors").write_bytes(b"x"),
               "model.safetensors is gone": lambda: (ck / "model.safetensors").unlink()}
    for match, change in changes.items():
        shutil.rmtree(ck)
        shutil.copytree(TINY_REF, ck)
        change()
        capsys.readouterr()
        assert cli.main(["run", str(folder), *torch_args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


@pytest.mark.skipif(not PIPO_RUN.is_file(), reason="the C++ runtime is not built (make cpp)")
@pytest.mark.parametrize("args,match", [
    (["--max-steps", str(1 << 62), "--max-new-tokens", str(1 << 62)], "context"),
    (["--max-steps", str((1 << 63) - 1)], "context"),
    (["--threads", "1024"], "threads"),
], ids=["steps 2^62", "steps 2^63-1", "threads 1024"])
def test_cpp_numbers_cannot_overflow(pristine, args, match):
    proc = subprocess.run([str(PIPO_RUN), str(pristine), "--ids", "5,17", *args],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc
    assert match in lines[0], lines
