"""The bad-input table: config, checkpoint, adapter, export folder and request cases, each run
through `pipo-export` in process. Every case must end in exactly one stderr line naming the
problem, exit 2, no traceback (an uncaught exception fails the case) and nothing written."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from pipo_export import cli
from pipo_graphs.seal import write_sealed

from conftest import TINY_REF


# ---------------------------------------------------------------------------- case folders
def _config(edit):
    """A checkpoint case: the tiny checkpoint with config.json edited (a dict -> dict function,
    or bytes/str written as the file)."""
    def make(root: Path, fx) -> list[str]:
        ck = root / "ck"
        shutil.copytree(TINY_REF, ck)
        path = ck / "config.json"
        if callable(edit):
            data = json.loads(path.read_text())
            edit(data)
            path.write_text(json.dumps(data))
        elif isinstance(edit, bytes):
            path.write_bytes(edit)
        else:
            path.write_text(edit)
        return ["run", str(ck), "--backend", "torch", "--ids", "5", "--max-steps", "1"]
    return make


def _edit_config(ck: Path, **kw):
    data = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(data, **kw)))


def _set(**kw):
    return _config(lambda d: d.update(kw))


def _drop(key):
    return _config(lambda d: d.pop(key))


def _weights(edit):
    """A checkpoint case: model.safetensors (or the folder) changed by edit(folder)."""
    def make(root: Path, fx) -> list[str]:
        ck = root / "ck"
        shutil.copytree(TINY_REF, ck)
        edit(ck)
        return ["run", str(ck), "--backend", "torch", "--ids", "5", "--max-steps", "1"]
    return make


def _tensors(edit):
    def change(ck: Path):
        from safetensors.torch import load_file, save_file
        state = load_file(str(ck / "model.safetensors"))
        edit(state)
        save_file(state, str(ck / "model.safetensors"))
    return _weights(change)


def _truncate(ck: Path, keep: float = 0.5):
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[:int(len(data) * keep)])


def _header(ck: Path, header: bytes, length: int | None = None):
    (ck / "model.safetensors").write_bytes(struct.pack("<Q", length or len(header)) + header)


def _index(ck: Path, text: str):
    (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
    (ck / "model.safetensors.index.json").write_text(text)


def _adapter(edit=None, args=("--base", "{base}")):
    """An adapter case: the peft pair (base, adapter) with edit(base, adapter) applied."""
    def make(root: Path, fx) -> list[str]:
        base, adapter = root / "base", root / "adapter"
        shutil.copytree(fx["pair"][0], base)
        shutil.copytree(fx["pair"][1], adapter)
        if edit:
            edit(base, adapter)
        return ["run", str(adapter), "--backend", "torch", "--ids", "5", "--max-steps", "1",
                *[a.format(base=base) for a in args]]
    return make


def _adapter_config(**kw):
    def edit(base, adapter):
        path = adapter / "adapter_config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **kw)))
    return _adapter(edit)


def _adapter_tensor(change):
    def edit(base, adapter):
        from safetensors.torch import load_file, save_file
        path = adapter / "adapter_model.safetensors"
        state = load_file(str(path))
        change(state)
        save_file(state, str(path))
    return _adapter(edit)


def _lora_a(state):
    key = next(k for k in sorted(state) if "lora_A" in k)
    state[key] = state[key][:, :-1].contiguous()


def _export(edit=None, args=("--ids", "5", "--max-steps", "2")):
    """An export-folder case: a copy of the tiny export with edit(folder) applied."""
    def make(root: Path, fx) -> list[str]:
        out = root / "export"
        shutil.copytree(fx["export"], out)
        if edit:
            edit(out)
        return ["run", str(out), *args]
    return make


def _sealed(text):
    return _export(lambda f: write_sealed(f / "manifest.json", text))


def _manifest(edit):
    def change(folder: Path):
        data = json.loads((folder / "manifest.json").read_text())
        edit(data)
        write_sealed(folder / "manifest.json", json.dumps(data))
    return _export(change)


def _request(*args):
    return _export(args=("--max-steps", "2", *args) if "--max-steps" not in " ".join(args)
                   and "--max-new-tokens" not in " ".join(args) else args)


def _model_field(**kw):
    return _manifest(lambda d: d["model"].update(kw))


def _file_at(name: str):
    def make(root: Path, fx) -> list[str]:
        (root / "file").write_text("x")
        return ["run", str(root / "file" / name) if name else str(root / "file"),
                "--ids", "5", "--max-steps", "1"]
    return make


def _tiny_out(prepare, extra=()):
    def make(root: Path, fx) -> list[str]:
        return ["tiny", str(prepare(root)), *extra]
    return make


def _export_flags(*flags, edit=None):
    """An export case: `export` of the tiny checkpoint (edited by edit(folder)) with flags."""
    def make(root: Path, fx) -> list[str]:
        ck = root / "ck"
        shutil.copytree(TINY_REF, ck)
        if edit:
            edit(ck)
        return ["export", str(ck), "-o", str(root / "out"), *flags]
    return make


def _existing(root: Path) -> Path:
    (root / "out").mkdir()
    return root / "out"


def _under_file(root: Path) -> Path:
    (root / "file").write_text("x")
    return root / "file" / "sub"


def _not_utf8(folder: Path):
    """manifest.json bytes that are not UTF-8, sealed (so only the decoding can fail)."""
    data = b"\xff{}"
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


N = 10 ** 30
CASES = {
    # -------------------------------------------------------------- config.json
    "config not JSON": (_config("{"), "config.json"),
    "config a list": (_config("[1, 2]"), "config.json"),
    "config a string": (_config('"abc"'), "config.json"),
    "config not UTF-8": (_config(b"\xff\xfe{}"), "config.json"),
    "config empty": (_config(""), "config.json"),
    "config a folder": (_weights(lambda ck: ((ck / "config.json").unlink(),
                                             (ck / "config.json").mkdir())), "config.json"),
    "no config": (_weights(lambda ck: (ck / "config.json").unlink()), "config.json"),
    "vocab_size missing": (_drop("vocab_size"), "config.json"),  # transformers' default vocab
    "vocab_size text": (_set(vocab_size="abc"), "vocab_size"),
    "vocab_size 0": (_set(vocab_size=0), "vocab_size"),
    "vocab_size negative": (_set(vocab_size=-5), "vocab_size"),
    "vocab_size bool": (_set(vocab_size=True), "vocab_size"),
    "vocab_size float": (_set(vocab_size=1.5), "vocab_size"),
    "vocab_size huge": (_set(vocab_size=N), "vocab_size"),
    "pad_token_id text": (_set(pad_token_id="abc"), "pad_token_id"),
    "pad_token_id = vocab": (_set(pad_token_id=512), "pad_token_id"),
    "pad_token_id negative": (_set(pad_token_id=-1), "pad_token_id"),
    "eos outside vocab": (_set(eos_token_id=9999), "eos_token_id"),
    "eos text": (_set(eos_token_id="x"), "eos_token_id"),
    "hidden_size 0": (_set(hidden_size=0), "hidden_size"),
    "layer_types unknown": (_set(layer_types=["linear_attention"] * 3 + ["conv"]), "layer_types"),
    "layer_types not a list": (_set(layer_types="abc"), "layer_types"),
    "layer_types length": (_set(layer_types=["full_attention"] * 3), "layer_types"),
    "num_attention_heads 0": (_set(num_attention_heads=0), "num_attention_heads"),
    "head_dim text": (_set(head_dim="16"), "head_dim"),
    "compressor_type unknown": (_set(compressor_type="conv"), "compressor_type"),
    "rms_norm_eps text": (_set(rms_norm_eps="x"), "rms_norm_eps"),
    "rope_parameters a number": (_set(rope_parameters=5), "rope_parameters"),
    "max_position_embeddings 0": (_set(max_position_embeddings=0), "max_position_embeddings"),
    "conv kernel 0": (_set(linear_conv_kernel_dim=0), "linear_conv_kernel_dim"),
    "tie_word_embeddings text": (_set(tie_word_embeddings="yes"), "tie_word_embeddings"),
    # -------------------------------------------------------------- checkpoint weights
    "checkpoint missing": (lambda root, fx: ["run", str(root / "nope"), "--ids", "5"],
                           "no such folder"),
    "checkpoint is a file": (_file_at(""), "file"),
    "no safetensors": (_weights(lambda ck: (ck / "model.safetensors").unlink()), "safetensors"),
    "safetensors truncated": (_weights(_truncate), "model.safetensors"),
    "safetensors empty": (_weights(lambda ck: _truncate(ck, 0)), "model.safetensors"),
    "safetensors header garbage": (_weights(lambda ck: _header(ck, b"not json")),
                                   "model.safetensors"),
    "safetensors header huge": (_weights(lambda ck: _header(ck, b"{}", 1 << 60)),
                                "model.safetensors"),
    "safetensors a folder": (_weights(lambda ck: ((ck / "model.safetensors").unlink(),
                                                  (ck / "model.safetensors").mkdir())),
                             "model.safetensors"),
    "tensor missing": (_tensors(lambda s: s.pop("compressor.0.weight", None) if
                                "compressor.0.weight" in s else s.pop(sorted(s)[0])), "missing"),
    "tensor wrong shape": (_tensors(lambda s: s.update({k: s[k][:-1].contiguous() for k in
                                                       [sorted(s)[-1]]})), "shape"),
    "tensor int dtype": (_tensors(lambda s: s.update({k: s[k].long() for k in
                                                      [sorted(s)[-1]]})), "stored as int64"),
    "index not JSON": (_weights(lambda ck: _index(ck, "{")), "index.json"),
    "index shard missing": (_weights(lambda ck: _index(ck, json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}}))), "gone.safetensors"),
    # -------------------------------------------------------------- PEFT adapter
    "adapter without --base": (_adapter(args=()), "--base"),
    "adapter base missing": (_adapter(args=("--base", "{base}-gone")), "gone"),
    "adapter base a file": (_adapter(lambda b, a: (shutil.rmtree(b), b.write_text("x"))), "base"),
    "adapter_config not JSON": (_adapter(lambda b, a: (a / "adapter_config.json").write_text("{")),
                                "adapter_config.json"),
    "adapter_config a list": (_adapter(lambda b, a: (a / "adapter_config.json").write_text("[]")),
                              "adapter_config.json"),
    "adapter peft_type": (_adapter_config(peft_type="PREFIX_TUNING"), "PREFIX_TUNING"),
    "adapter r 0": (_adapter_config(r=0), "r"),
    "adapter r text": (_adapter_config(r="four"), "r"),
    "adapter lora_alpha text": (_adapter_config(lora_alpha="x"), "lora_alpha"),
    "adapter weights missing": (_adapter(lambda b, a: (a / "adapter_model.safetensors").unlink()),
                                "adapter_model.safetensors"),
    "adapter weights truncated": (_adapter(lambda b, a: (a / "adapter_model.safetensors")
                                           .write_bytes(b"\x10\0\0\0\0\0\0\0{")),
                                  "adapter_model.safetensors"),
    "adapter lora_A shape": (_adapter_tensor(_lora_a), "lora_A"),
    "adapter base config not JSON": (_adapter(lambda b, a: (b / "config.json").write_text("{")),
                                     "config.json"),
    # -------------------------------------------------------------- export folder
    "export is a file": (_file_at(""), "file"),
    "export under a file": (_file_at("sub"), "file"),
    "no manifest": (_export(lambda f: ((f / "manifest.json").unlink(),
                                       (f / "manifest.sha256").unlink())), "manifest.json"),
    "manifest not JSON": (_sealed("{"), "not valid JSON"),
    "manifest a list": (_sealed("[]"), "not a JSON object"),
    "manifest not UTF-8": (_export(_not_utf8), "UTF-8"),
    "manifest edited": (_export(lambda f: (f / "manifest.json").write_text(
        (f / "manifest.json").read_text().replace('"pad_token_id": 511', '"pad_token_id": 5'))),
                        "does not match its sha256"),
    "manifest seal missing": (_export(lambda f: (f / "manifest.sha256").unlink()),
                              "manifest.sha256: missing"),
    "manifest seal garbage": (_export(lambda f: (f / "manifest.sha256").write_text("zz")),
                              "not a sha256 line"),
    "manifest a folder": (_export(lambda f: ((f / "manifest.json").unlink(),
                                             (f / "manifest.json").mkdir())), "manifest.json"),
    "decode graph missing": (_export(lambda f: (f / "decode_unfold.onnx").unlink()), "missing"),
    "weights truncated": (_export(lambda f: (f / "weights.data").write_bytes(b"\0")),
                          "weights.data"),
    "contract 2.0": (_manifest(lambda d: d.update(contract_version="2.0")), "contract 2.0"),
    "manifest vocab 0": (_model_field(vocab_size=0), "vocab_size"),
    "manifest pad outside": (_model_field(pad_token_id=512), "pad_token_id"),
    "manifest pad text": (_model_field(pad_token_id="abc"), "pad_token_id"),
    "manifest pad bool": (_model_field(pad_token_id=True), "pad_token_id"),
    "manifest no states": (_manifest(lambda d: d.pop("states")), "states"),
    "manifest bytes text": (_manifest(lambda d: next(iter(d["files"].values())).update(bytes="x")),
                            "bytes"),
    "manifest target unknown": (_manifest(lambda d: d["export"].update(target="tflite")),
                                "target"),
    # -------------------------------------------------------------- request
    "ids text": (_request("--ids", "abc"), "--ids"),
    "ids negative": (_request("--ids", "-1"), "-1"),
    "ids = vocab": (_request("--ids", "512"), "512"),
    "ids empty": (_request("--ids", ""), "--ids"),
    "ids beyond int64": (_request("--ids", str(N)), "outside"),
    "no prompt": (_request(), "prompt"),
    "text without tokenizer": (_request("--prompt", "hello"), "tokenizer"),
    "top-k beyond int64": (_request("--ids", "5", "--top-k", str(N)), "top_k"),
    "top-k negative": (_request("--ids", "5", "--top-k", "-1"), "top_k"),
    "top-p 0": (_request("--ids", "5", "--top-p", "0"), "top_p"),
    "top-p 1.5": (_request("--ids", "5", "--top-p", "1.5"), "top_p"),
    "temperature -1": (_request("--ids", "5", "--temperature", "-1"), "temperature"),
    "temperature nan": (_request("--ids", "5", "--temperature", "nan"), "temperature"),
    "temperature inf": (_request("--ids", "5", "--temperature", "inf"), "temperature"),
    "min-p 2": (_request("--ids", "5", "--min-p", "2"), "min_p"),
    "repetition-penalty 0": (_request("--ids", "5", "--repetition-penalty", "0"),
                             "repetition_penalty"),
    "repetition-penalty inf": (_request("--ids", "5", "--repetition-penalty", "inf"),
                               "repetition_penalty"),
    "presence-penalty nan": (_request("--ids", "5", "--presence-penalty", "nan"),
                             "presence_penalty"),
    "threshold nan": (_request("--ids", "5", "--threshold", "nan"), "threshold"),
    "threshold text": (_request("--ids", "5", "--threshold", "high"), "--threshold"),
    "max-steps 0": (_request("--ids", "5", "--max-steps", "0"), "max_steps"),
    "max-steps negative": (_request("--ids", "5", "--max-steps", "-3"), "max_steps"),
    "max-new-tokens 0": (_request("--ids", "5", "--max-new-tokens", "0"), "max_new_tokens"),
    "beyond max context": (_request("--ids", "5", "--max-steps", "100000"), "context"),
    "seed negative": (_request("--ids", "5", "--seed", "-1"), "seed"),
    "seed beyond uint64": (_request("--ids", "5", "--seed", str(N)), "seed"),
    "stop id outside vocab": (_request("--ids", "5", "--stop-token-ids", "9999"), "9999"),
    "backend unknown": (_request("--ids", "5", "--backend", "tflite"), "--backend"),
    "provider unavailable": (_request("--ids", "5", "--providers", "cuda"), "onnxruntime-gpu"),
    "threads negative": (_request("--ids", "5", "--threads", "-1"), "threads"),
    "threads 1024": (_request("--ids", "5", "--threads", "1024"), "threads"),
    # -------------------------------------------------------------- export options
    "max-context -5": (_export_flags("--max-context", "-5"), "--max-context"),
    "max-context 0": (_export_flags("--max-context", "0"), "--max-context"),
    "max-context 1": (_export_flags("--max-context", "1"), "--max-context"),
    "max-context 3": (_export_flags("--max-context", "3"), "--max-context"),
    "opset 7": (_export_flags("--opset", "7"), "--opset"),
    "opset 99": (_export_flags("--opset", "99"), "--opset"),
    "sample-cap 0": (_export_flags("--sample-cap", "0"), "--sample-cap"),
    "sample-cap -1": (_export_flags("--sample-cap", "-1"), "--sample-cap"),
    "trace-cache a file": (_export_flags("--trace-cache", str(TINY_REF / "config.json")),
                           "--trace-cache"),
    "tokenizer.json broken": (_export_flags(edit=lambda ck: (ck / "tokenizer.json")
                                            .write_text("{")), "tokenizer.json"),
    "pad_token_id 1.7": (_set(pad_token_id=1.7), "pad_token_id"),
    "max_position_embeddings 3": (_export_flags(edit=lambda ck: _edit_config(
        ck, max_position_embeddings=3)), "max_position_embeddings"),
    # -------------------------------------------------------------- output folders
    "output exists": (_tiny_out(_existing), "--force"),
    "output under a file": (_tiny_out(_under_file), "file"),
    "output under a file, forced": (_tiny_out(_under_file, ("--force",)), "file"),
}


class _Fixtures:
    """The tiny export and the peft pair, made on first use only."""

    def __init__(self, request, tmp_path_factory):
        self.request, self.factory, self.made = request, tmp_path_factory, {}

    def __getitem__(self, key):
        if key not in self.made:
            if key == "export":
                self.made[key] = self.request.getfixturevalue("trt_export")
            else:
                from peft_pairs import build
                self.made[key] = build(self.factory.mktemp("bad-adapter"))[:2]
        return self.made[key]


@pytest.fixture(scope="module")
def fx(request, tmp_path_factory):
    return _Fixtures(request, tmp_path_factory)


def test_table_is_large_enough():
    assert len(CASES) >= 60


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (a flag's type)
        return exc.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, fx, tmp_path, capsys):
    make, match = CASES[case]
    root = tmp_path / "case"
    root.mkdir()
    argv = make(root, fx)
    capsys.readouterr()  # fixtures made on first use print their progress
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code = _main(argv)
    assert code == 2, (case, code)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (case, err)
    assert match.lower() in lines[0].lower(), (case, lines[0])
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert after == before, (case, set(after) ^ set(before))  # nothing written or left behind
