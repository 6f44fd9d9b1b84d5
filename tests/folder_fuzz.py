"""Fuzz of export folders: random edits, each resealed (the seal is a checksum, so an attacker
reseals), to manifest fields, graph file names, external-data offsets, lengths and locations,
and the files table (entries dropped, added outside, symlinked outside). Each edited folder is
run by pipo_runtime (in process) and/or the C++ pipo-run. A run must either be refused in one
line (PipoUserError / `error: ...`, exit 2) or give the tokens of the unedited export; no run
may crash, print a traceback, or open a file of the `outside` folder (inotify sees every
process; an audit hook also records Python's own opens).

    python tests/folder_fuzz.py EXPORT --edits 10000 --seed 1 [--runtimes python,cpp]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).parent))
from export_edits import (DECODE_FILE, PREFILL_FILE, WEIGHTS_FILE, external_tensors,  # noqa: E402
                          read_manifest, reseal)
from fs_watch import OpenWatch  # noqa: E402

PIPO_RUN = Path(__file__).resolve().parents[1] / "build" / "cpp" / "pipo-run"
IDS, STEPS = [5, 17], 3
NAMES = [PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE, "manifest.json", "manifest.sha256",
         "../outside/" + PREFILL_FILE, "../outside/w.data", "OUTSIDE/" + DECODE_FILE, "",
         ".", "./" + PREFILL_FILE, PREFILL_FILE + "/", "a/../" + DECODE_FILE, "nope.onnx",
         "link.onnx", "link.data", "\\x", "x\0y"]
VALUES = [-1, 0, 1, 2, 3, 4, -40960, 2 ** 31, 2 ** 63, 2 ** 64, 1.7, "", "x", None, True,
          [], {}, [1, 2], {"a": 1}, "float16", "tensorrt", "../outside/w.data"]
NUMBERS = ["-40960", "-1", "0", "1", "+4", " 12", "1e3", "abc", "", str(2 ** 63),
           str(2 ** 64 - 1), str(2 ** 64), str(2 ** 70), "007"]


class Editor:
    """Random resealed edits of one export folder (`outside` holds identical copies of its
    files, the targets an attacker would point at)."""

    def __init__(self, rng: random.Random, folder: Path, outside: Path):
        self.rng, self.folder, self.outside = rng, folder, outside

    def name(self) -> str:
        name = self.rng.choice(NAMES)
        return name.replace("OUTSIDE", str(self.outside)) if name else name

    def manifest_field(self, m: dict) -> str:
        path, node = [], m
        while isinstance(node, (dict, list)) and node and self.rng.random() < 0.8:
            key = self.rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
            path.append(key)
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if not path:
            return "no-op"
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and self.rng.random() < 0.2:
            del parent[path[-1]]
            return f"del {path}"
        parent[path[-1]] = value = self.rng.choice(VALUES + [self.name()])
        return f"set {path} = {value!r}"[:120]

    def graph_file(self, m: dict) -> str:
        graph = self.rng.choice(["prefill_compress", "decode_unfold"])
        old, new = m["graphs"][graph]["file"], self.name()
        m["graphs"][graph]["file"] = new
        if self.rng.random() < 0.7 and old in m["files"]:
            m["files"][new] = m["files"][old]  # listed, with a checksum that may hold
        return f"graph {graph} file {new!r}"

    def external(self, m: dict) -> str:
        graph = self.rng.choice([PREFILL_FILE, DECODE_FILE])
        path = self.folder / graph
        if not path.is_file() or path.is_symlink():
            return "no-op"
        model = onnx.load(str(path), load_external_data=False)
        tensors = external_tensors(model)
        tensor = self.rng.choice(tensors)
        kv = {e.key: e.value for e in tensor.external_data}
        size = (self.folder / WEIGHTS_FILE).stat().st_size
        key = self.rng.choice(["offset", "offset", "length", "length", "location"])
        if key == "location":
            value = self.rng.choice([self.name(), str(self.outside / "w.data")])
        else:
            other = {e.key: e.value for e in self.rng.choice(tensors).external_data}
            value = self.rng.choice(NUMBERS + [str(size), str(size - 1), other.get(key, "0"),
                                               str(int(kv.get(key, 0)) + self.rng.choice(
                                                   [-8, -4, 4, 8, 1 << 20]))])
        kv[key] = value
        del tensor.external_data[:]
        for k, v in kv.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
        path.write_bytes(model.SerializeToString())
        if graph in m["files"] and self.rng.random() < 0.9:
            data = path.read_bytes()
            m["files"][graph] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return f"{graph} {tensor.name} {key} = {value!r}"[:120]

    def files_table(self, m: dict) -> str:
        kind = self.rng.randrange(6)
        names = sorted(m.get("files", {})) if isinstance(m.get("files"), dict) else []
        if kind == 0 and names:
            name = self.rng.choice(names)
            del m["files"][name]
            return f"files drop {name}"
        if kind == 1 and names:
            m["files"][self.name()] = m["files"][self.rng.choice(names)]
            return "files add entry"
        if kind == 2 and names:
            name = self.rng.choice(names)
            m["files"][name] = dict(m["files"][name], bytes=self.rng.choice(VALUES))
            return f"files {name} bytes"
        if kind in (3, 4):  # a listed file replaced by a symlink to its identical copy outside
            name = self.rng.choice([PREFILL_FILE, DECODE_FILE, WEIGHTS_FILE, "manifest.json"])
            target = self.outside / ("w.data" if name == WEIGHTS_FILE else name)
            if (self.folder / name).is_file() and not (self.folder / name).is_symlink():
                if name == "manifest.json":
                    return "symlink manifest.json"  # done after the reseal (see apply)
                (self.folder / name).unlink()
                (self.folder / name).symlink_to(target)
            return f"symlink {name} -> outside"
        link = self.rng.choice(["link.onnx", "link.data"])
        target = self.outside / (PREFILL_FILE if link == "link.onnx" else "w.data")
        if not (self.folder / link).exists():
            (self.folder / link).symlink_to(target)
        m.setdefault("files", {})[link] = {"sha256": "0" * 64, "bytes": 1}
        return f"symlink {link} listed"

    def apply(self, count: int) -> list[str]:
        m = read_manifest(self.folder)
        done = []
        for _ in range(count):
            edit = self.rng.choice([self.manifest_field, self.graph_file, self.external,
                                    self.files_table])
            try:
                done.append(edit(m))
            except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
                done.append(f"{edit.__name__} skipped ({type(exc).__name__})")
        reseal(self.folder, m)
        if "symlink manifest.json" in done:
            shutil.copy(self.folder / "manifest.json", self.outside / "manifest.json")
            (self.folder / "manifest.json").unlink()
            (self.folder / "manifest.json").symlink_to(self.outside / "manifest.json")
        return done


def _python_run(folder: Path) -> tuple[str, object]:
    """("refused", message) | ("tokens", list) | ("crash", repr)."""
    from pipo_graphs.errors import PipoUserError
    from pipo_runtime import GenerationConfig, PipoSession
    try:
        session = PipoSession.load(folder)
        try:
            out = session.generate([IDS], GenerationConfig(max_steps=STEPS))
        finally:
            session.close()
        return "tokens", out.sequences[0].tokens
    except PipoUserError as exc:
        return "refused", str(exc)
    except Exception as exc:  # noqa: BLE001 (a crash is what this fuzz looks for)
        return "crash", f"{type(exc).__name__}: {exc}"[:300]


def _cpp_run(folder: Path) -> tuple[str, object]:
    proc = subprocess.run([str(PIPO_RUN), str(folder), "--ids", ",".join(map(str, IDS)),
                           "--max-steps", str(STEPS), "--json"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0:
        return "tokens", json.loads(proc.stdout)["tokens"]
    if proc.returncode == 2 and proc.stdout == "":
        return "refused", proc.stderr
    return "crash", f"rc {proc.returncode}: {proc.stderr[-300:]}"


RUNNERS = {"python": _python_run, "cpp": _cpp_run}
_AUDIT = {"on": False, "outside": None, "opened": []}


def _audit(event: str, args) -> None:
    if _AUDIT["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.realpath(path).startswith(str(_AUDIT["outside"]) + os.sep):
            _AUDIT["opened"].append(path)


def fuzz(export: Path, edits: int, seed: int, runtimes=("python", "cpp"),
         work: Path | None = None, log=None) -> dict:
    """Run `edits` edited folders per runtime -> counts and the bad cases (see module doc)."""
    if not _AUDIT.get("hooked"):
        sys.addaudithook(_audit)
        _AUDIT["hooked"] = True
    work = Path(work or tempfile.mkdtemp(prefix="folder-fuzz-"))
    outside = (work / "outside").resolve()
    outside.mkdir(parents=True, exist_ok=True)
    for name in (PREFILL_FILE, DECODE_FILE):
        shutil.copy(export / name, outside / name)
    shutil.copy(export / WEIGHTS_FILE, outside / "w.data")
    baseline = {r: RUNNERS[r](export) for r in runtimes}
    assert all(kind == "tokens" for kind, _ in baseline.values()), baseline
    counts, bad = Counter(), []
    rng = random.Random(seed)
    for i in range(edits):
        folder = work / "export"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(export, folder)
        done = Editor(rng, folder, outside).apply(rng.randint(1, 3))
        for runtime in runtimes:
            _AUDIT.update(on=True, outside=outside, opened=[])
            with OpenWatch(outside) as watch:
                kind, value = RUNNERS[runtime](folder)
            _AUDIT["on"] = False
            opened = watch.opened() + _AUDIT["opened"]
            if kind == "refused" and (len(str(value).strip().splitlines()) != 1
                                      or "Traceback" in str(value)):
                kind = "not one line"
            elif kind == "tokens":
                kind = "same tokens" if value == baseline[runtime][1] else "wrong tokens"
            counts[runtime, kind] += 1
            if opened:
                counts[runtime, "read outside"] += 1
            if kind in ("crash", "not one line", "wrong tokens") or opened:
                bad.append({"case": i, "runtime": runtime, "edits": done, "result": kind,
                            "value": str(value)[:300], "opened": opened})
        if log and (i + 1) % 100 == 0:
            log(f"{i + 1}/{edits}: {dict((f'{r}:{k}', n) for (r, k), n in counts.items())}")
    shutil.rmtree(work, ignore_errors=True)
    return {"edits": edits, "seed": seed,
            "counts": {f"{r}: {k}": n for (r, k), n in sorted(counts.items())}, "bad": bad}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export")
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runtimes", default="python,cpp")
    ns = p.parse_args()
    report = fuzz(Path(ns.export), ns.edits, ns.seed, tuple(ns.runtimes.split(",")),
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2))
    return 0 if not report["bad"] else 1


if __name__ == "__main__":
    sys.exit(main())
