"""The plain Qwen3.5 Hugging Face folder the peers convert, written from the PIPO checkpoint: the
same backbone weights, byte for byte.

- weights: every tensor of the checkpoint except PIPO's own modules (`compressor.*`,
  `confidence_head.*`), in their stored dtype and keys (released layout:
  `model.language_model.*`, `model.visual.*`, Qwen's `mtp.*`), re-sharded with a new index;
- config.json: the multimodal wrapper without the PIPO fields (top-level compressor_type,
  pad/eos ids, mtp_num_hidden_layers; text_config's compressor_type), `architectures`
  `Qwen3_5ForConditionalGeneration` (what the GenAI model builder dispatches on); when the
  checkpoint holds `mtp.*`, text_config declares `mtp_num_hidden_layers` as the release does;
- generation_config.json: the checkpoint's pad and eos ids;
- tokenizer.json: a synthetic byte-level BPE with exactly vocab_size entries (256 bytes, then
  generated merges, then special tokens at the config's ids), with Qwen3.5's pre-tokenizer
  (its Split regex, isolated, + ByteLevel without regex). Both converters load a tokenizer; no
  benchmark tokenizes text (prompts are token ids). Its pre-tokenizer hash is unknown to
  llama.cpp's converter, which gguf_child handles.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from pipo_graphs.errors import PipoUserError

PIPO_PREFIXES = ("compressor.", "confidence_head.")
PIPO_TOP_FIELDS = ("compressor_type", "pad_token_id", "eos_token_id", "mtp_num_hidden_layers")
ARCHITECTURE = "Qwen3_5ForConditionalGeneration"
INDEX = "model.safetensors.index.json"
# Qwen3.5's pre-tokenizer split regex (from its tokenizer.json)
QWEN35_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
                      r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ROLE_NAMES = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
              "vision_start_token_id": "<|vision_start|>",
              "vision_end_token_id": "<|vision_end|>"}


@dataclass
class HfFolder:
    """What write_hf_folder wrote (or found)."""

    folder: Path
    tensors: int
    bytes: int
    dropped: list[str]
    reused: bool = False


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def pipo_ids(config: dict) -> tuple[int | None, list[int]]:
    """(pad id, eos ids) of a PIPO checkpoint config (top level first, then text_config)."""
    text = config.get("text_config", {})
    pad = config.get("pad_token_id", text.get("pad_token_id"))
    eos = _ids(config.get("eos_token_id", text.get("eos_token_id")))
    return (None if pad is None else int(pad)), eos


def base_config(config: dict, has_mtp: bool) -> dict:
    """config.json of the plain Qwen3.5 model under a PIPO checkpoint's config."""
    if config.get("model_type") != "qwen3_5" or "text_config" not in config:
        raise PipoUserError("the peers need the released multimodal layout (config.json with "
                            "model_type qwen3_5 and a text_config); this checkpoint has "
                            f"model_type {config.get('model_type')!r}")
    out = copy.deepcopy(config)
    top = {k: out.pop(k) for k in PIPO_TOP_FIELDS if k in out}
    text = out["text_config"]
    text.pop("compressor_type", None)
    eos = _ids(text.get("eos_token_id"))
    if len(eos) > 1:
        text["eos_token_id"] = eos[0]  # the release's text_config holds one id
    if has_mtp:
        text.setdefault("mtp_num_hidden_layers", int(top.get("mtp_num_hidden_layers", 1)))
    out["architectures"] = [ARCHITECTURE]
    return out


def special_names(config: dict, vocab_size: int) -> dict[int, str]:
    """Special token id -> name: Qwen3.5's chat ids when the vocabulary has them, the wrapper's
    vision ids, the PIPO pad and eos ids; every id above the lowest one is special too
    (`<|reserved_N|>`), so the vocabulary is dense."""
    from pipo_export.model.shapes import ENDOFTEXT, IM_END, IM_START
    names: dict[int, str] = {}
    if vocab_size > IM_END:
        names.update({ENDOFTEXT: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"})
    for key, name in ROLE_NAMES.items():
        if config.get(key) is not None and int(config[key]) < vocab_size:
            names.setdefault(int(config[key]), name)
    pad, eos = pipo_ids(config)
    for i, name in [(pad, "<|endoftext|>")] + [(e, "<|im_end|>") for e in eos]:
        if i is not None and 0 <= i < vocab_size and i not in names:
            names[i] = name if name not in names.values() else f"<|special_{i}|>"
    if not names:
        names[vocab_size - 1] = "<|endoftext|>"
    first = min(names)
    if first <= 256:
        raise PipoUserError(f"special token id {first} leaves no room for a byte-level BPE "
                            "vocabulary below it")
    return {i: names.get(i, f"<|reserved_{i}|>") for i in range(first, vocab_size)}


def synthetic_merges(count: int) -> list[tuple[str, str]]:
    """`count` BPE merges over the byte-level alphabet: every byte pair, then (pair, byte),
    ...; each merge joins two existing tokens into a new one, all distinct."""
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges: list[tuple[str, str]] = []
    level = alphabet
    while len(merges) < count:
        nxt = []
        for a in level:
            for b in alphabet:
                merges.append((a, b))
                nxt.append(a + b)
                if len(merges) == count:
                    return merges
        level = nxt
    return merges


def write_tokenizer(folder: Path, config: dict, vocab_size: int) -> dict[int, str]:
    """tokenizer.json (exactly vocab_size entries) and tokenizer_config.json; -> specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    specials = special_names(config, vocab_size)
    merges = synthetic_merges(min(specials) - 256)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN35_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False)
                            for i in sorted(specials)])
    if tok.get_vocab_size() != vocab_size or any(tok.token_to_id(n) != i
                                                 for i, n in specials.items()):
        raise AssertionError("synthetic tokenizer ids do not match the config")
    tok.save(str(folder / "tokenizer.json"))
    pad, eos = pipo_ids(config)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 262144, "bos_token": None,
        "eos_token": specials.get(eos[-1]) if eos else None,
        "pad_token": specials.get(pad) if pad is not None else None, "unk_token": None,
        "add_bos_token": False, "add_prefix_space": False, "errors": "replace",
        "clean_up_tokenization_spaces": False, "split_special_tokens": False}, indent=2) + "\n")
    return specials


def checkpoint_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors files, in index order (or the single file)."""
    index = checkpoint / INDEX
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        return [checkpoint / n for n in dict.fromkeys(sorted(names))]
    single = checkpoint / "model.safetensors"
    if not single.is_file():
        raise PipoUserError(f"{checkpoint} has no model.safetensors or {INDEX}")
    return [single]


def copy_weights(files: list[Path], out: Path, shard_bytes: int) -> tuple[int, int, list[str]]:
    """Every tensor but PIPO's modules into out's shards (one shard in memory at a time);
    -> (tensors, bytes, dropped keys)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    shards: list[dict] = [{}]
    size, count, total, dropped, written = 0, 0, 0, [], []

    def flush() -> None:
        name = f"part-{len(written):05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        written.append((name, list(shards[-1])))
        shards[-1] = {}

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(PIPO_PREFIXES):
                    dropped.append(key)
                    continue
                t = f.get_tensor(key)
                nbytes = t.numel() * t.element_size()
                if shards[-1] and size + nbytes > shard_bytes:
                    flush()
                    size = 0
                shards[-1][key] = t
                size, count, total = size + nbytes, count + 1, total + nbytes
    if shards[-1]:
        flush()
    weight_map = {}
    for i, (name, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))},
                                        indent=2) + "\n")
    return count, total, dropped


def write_hf_folder(checkpoint: str | Path, out: str | Path, force: bool = False,
                    shard_bytes: int = 2 * 10**9) -> HfFolder:
    """Write (or reuse, unless force) the plain Qwen3.5 folder of a PIPO checkpoint."""
    from pipo_export.fsutil import atomic_dir
    checkpoint, out = Path(checkpoint), Path(out)
    if not force and (out / INDEX).is_file() and (out / "tokenizer.json").is_file():
        index = json.loads((out / INDEX).read_text())
        return HfFolder(out, len(index["weight_map"]), index["metadata"]["total_size"], [],
                        reused=True)
    config = json.loads((checkpoint / "config.json").read_text())
    files = checkpoint_files(checkpoint)
    with atomic_dir(out, force=True) as tmp:
        count, total, dropped = copy_weights(files, tmp, shard_bytes)
        index = json.loads((tmp / INDEX).read_text())
        has_mtp = any(k.startswith("mtp.") for k in index["weight_map"])
        base = base_config(config, has_mtp)
        (tmp / "config.json").write_text(json.dumps(base, indent=2) + "\n")
        pad, eos = pipo_ids(config)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": eos, "pad_token_id": pad, "do_sample": False}, indent=2) + "\n")
        write_tokenizer(tmp, config, int(base["text_config"]["vocab_size"]))
    return HfFolder(out, count, total, dropped)
