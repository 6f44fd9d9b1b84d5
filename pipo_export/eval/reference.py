"""What an eval compares against: another export, a checkpoint (torch), or a reference file.

A reference file (`eval --save-reference F`, like llama.cpp's --kl-divergence-base) holds the
scores of one run so later runs compare against it without the reference model: a magic line,
an 8-byte little-endian header length, a JSON header (vocabulary, tokenizer fingerprint, the
token ids' sha256, window size, positions), then float32 rows [positions, 2V + 1]: token 1's
log-probabilities, token 2's, the confidence. It is written to a temporary sibling and renamed,
so a failed run leaves no partial file.

Every reference must read the same tokens: the same model vocabulary and a tokenizer that
encodes the text to the same ids; otherwise it is refused, naming the difference.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipo_graphs.errors import PipoUserError

from pipo_export.eval.graphs import ExportScorer
from pipo_export.eval.metrics import Scores

MAGIC = b"PIPO-EVAL-REFERENCE 1\n"
MANIFEST, CONFIG = "manifest.json", "config.json"
HEADER_KEYS = {"vocab_size", "tokenizer_sha256", "ids_sha256", "context", "windows", "positions",
               "source"}


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, "<i8").tobytes()).hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's canonical serialization (vocabulary, merges, normalization)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def tokenizer_difference(mine, theirs) -> str | None:
    """None when both tokenizers are the same, else the first difference, in words."""
    if tokenizer_digest(mine) == tokenizer_digest(theirs):
        return None
    a, b = mine.get_vocab(with_added_tokens=True), theirs.get_vocab(with_added_tokens=True)
    if len(a) != len(b):
        return f"its tokenizer has {len(b)} tokens, the export's {len(a)}"
    for token in sorted(set(a) | set(b), key=lambda t: (a.get(t, -1), t)):
        if a.get(token) != b.get(token):
            return (f"its tokenizer maps {token!r} to id {b.get(token)}, the export's to "
                    f"{a.get(token)}")
    return "its tokenizer.json differs from the export's (same vocabulary, other merges or " \
           "normalization)"


class Reference:
    """scores(ids, start) -> Scores of a window group ids [B, T] whose first window is window
    number `start`. `label` names it in the report."""

    label = "reference"

    def scores(self, ids: np.ndarray, start: int) -> Scores:
        raise NotImplementedError


class ExportReference(Reference):
    def __init__(self, folder: Path, threads: int):
        self.scorer = ExportScorer.load(folder, threads)
        self.label = f"export {folder}"

    def scores(self, ids, start):
        return Scores.from_logits(*self.scorer.score(ids))


class CheckpointReference(Reference):
    """A checkpoint through torch (PipoModel.teacher_forced, float32)."""

    def __init__(self, folder: Path):
        from pipo_export import load_checkpoint
        self.model = load_checkpoint(folder)
        self.label = f"checkpoint {folder} (torch float32)"

    def scores(self, ids, start):
        import torch
        backbone, mtp, conf = self.model.teacher_forced(torch.from_numpy(ids))
        return Scores.from_logits(backbone[:, :-1].float().numpy(), mtp.float().numpy(),
                                  conf.float().numpy())


class FileReference(Reference):
    """A file written by `ReferenceWriter` (see the module doc)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise PipoUserError(f"{path}: not an eval reference file (write one with "
                                    "pipo-export eval OUT --text FILE --save-reference F)")
            size = int.from_bytes(f.read(8), "little")
            try:
                self.header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.header = None
        missing = HEADER_KEYS - set(self.header) if isinstance(self.header, dict) else ["all"]
        if missing:
            raise PipoUserError(f"{path}: its header is damaged (missing {sorted(missing)}); "
                                "write it again with --save-reference")
        v, n = self.header["vocab_size"], self.header["positions"]
        offset = len(MAGIC) + 8 + size
        if path.stat().st_size != offset + n * (2 * v + 1) * 4:
            raise PipoUserError(f"{path}: truncated (expected {n} positions of {v} tokens); "
                                "write it again")
        self.rows = np.memmap(path, np.float32, "r", offset, (n, 2 * v + 1))
        self.label = f"file {path} ({self.header['source']})"
        self.offsets = np.cumsum([0] + [t // 2 - 1 for t in self.header["windows"]])

    def scores(self, ids, start):
        v = self.header["vocab_size"]
        rows = self.rows[self.offsets[start]:self.offsets[start + len(ids)]]
        return Scores(rows[:, :v], rows[:, v:2 * v], rows[:, 2 * v])


class ReferenceWriter:
    """Writes the subject's scores as a reference file, window group by window group."""

    def __init__(self, path: Path, header: dict):
        v, n = header["vocab_size"], header["positions"]
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")
        blob = json.dumps(header).encode()
        with open(self.tmp, "wb") as f:
            f.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            f.truncate(f.tell() + n * (2 * v + 1) * 4)
        self.rows = np.memmap(self.tmp, np.float32, "r+", len(MAGIC) + 8 + len(blob),
                              (n, 2 * v + 1))
        self.done, self.v = 0, v

    def add(self, scores: Scores) -> None:
        n, v = len(scores.confidence), self.v
        block = self.rows[self.done:self.done + n]
        block[:, :v], block[:, v:2 * v], block[:, 2 * v] = (scores.logp1, scores.logp2,
                                                           scores.confidence)
        self.done += n

    def close(self) -> None:
        self.rows.flush()
        del self.rows
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.rows = None
        self.tmp.unlink(missing_ok=True)


def open_reference(path: str | Path, facts: dict, threads: int = 0) -> Reference:
    """The reference at `path` (an export folder, a checkpoint folder or a reference file),
    checked against the subject's facts: vocab_size, tokenizer, ids, windows (see
    eval.run.subject_facts). PipoUserError naming any difference."""
    path = Path(path)
    if path.is_file():
        ref = FileReference(path)
        _check_file(ref, facts)
        return ref
    if (path / MANIFEST).is_file():
        ref, vocab = ExportReference(path, threads), None
        vocab = ref.scorer.vocab_size
    elif (path / CONFIG).is_file():
        ref = CheckpointReference(path)
        vocab = ref.model.config.vocab_size
    else:
        raise PipoUserError(f"--reference {path}: not an export folder ({MANIFEST}), a "
                            f"checkpoint folder ({CONFIG}) or a reference file")
    if vocab != facts["vocab_size"]:
        raise PipoUserError(f"--reference {path}: its vocabulary has {vocab} tokens, the "
                            f"export's {facts['vocab_size']}; compare models of one vocabulary")
    from pipo_runtime.folder import TOKENIZER
    from pipo_runtime.text import load_tokenizer
    tokenizer = load_tokenizer(ref.scorer.tokenizer_path if isinstance(ref, ExportReference)
                               else path / TOKENIZER)
    if tokenizer is None:
        raise PipoUserError(f"--reference {path}: no tokenizer.json, so eval cannot check it "
                            "reads the text as the export does; copy the export's tokenizer.json "
                            "there")
    why = tokenizer_difference(facts["tokenizer"], tokenizer)
    if why:
        raise PipoUserError(f"--reference {path}: {why}; compare models of one tokenizer")
    return ref


def _check_file(ref: FileReference, facts: dict) -> None:
    h, path = ref.header, ref.path
    checks = (("vocab_size", "its vocabulary has {theirs} tokens, the export's {mine}"),
              ("tokenizer_sha256", "it was written with another tokenizer (sha256 {theirs:.12}, "
                                   "the export's {mine:.12})"),
              ("ids_sha256", "it scored another text (token ids sha256 {theirs:.12}, this "
                             "text's {mine:.12})"),
              ("context", "it scored windows of {theirs} tokens, this run {mine}: pass "
                          "--context {theirs}"))
    for key, message in checks:
        if h.get(key) != facts[key]:
            raise PipoUserError(f"--reference {path}: "
                                + message.format(theirs=h.get(key), mine=facts[key]))


__all__ = ["open_reference", "ReferenceWriter", "Reference"]
