"""Tokenizer loading and the JSON shape of a generation result (shared by every backend)."""
from __future__ import annotations

from pathlib import Path

from pipo_graphs.contract import SKIPPED_CONFIDENCE
from pipo_graphs.errors import PipoUserError
from pipo_graphs.semantics import SequenceOutput

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


class TokenizerError(PipoUserError):
    pass


def load_tokenizer(path: str | Path | None):
    """tokenizer.json at `path` as a `tokenizers.Tokenizer`, or None when absent (for an
    export: the path pipo_runtime.folder vouches for, None when the seal does not cover one)."""
    if path is None or not Path(path).is_file():
        return None
    path = Path(path)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("the folder has tokenizer.json but the 'tokenizers' package is "
                             "missing: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception for a malformed file
        raise TokenizerError(f"{path}: not a valid tokenizer.json "
                             f"({str(exc).splitlines()[0][:120] if str(exc) else exc!r}); "
                             "re-export or remove it") from None


def encode(tokenizer, text: str, folder) -> list[int]:
    if tokenizer is None:
        raise TokenizerError(f"--prompt needs tokenizer.json in {folder}; pass ids with --ids "
                             "instead")
    return tokenizer.encode(text, add_special_tokens=False).ids


def result_dict(out: SequenceOutput, tokenizer=None) -> dict:
    """JSON-ready dict: pairs (PAD included), confidence (null where the head was skipped),
    tokens (PAD removed, cut at EOS), commit_rate, finish_reason, text when a tokenizer exists."""
    conf = [None if c == SKIPPED_CONFIDENCE else c for c in out.confidence]
    d = {"pairs": out.pairs, "confidence": conf, "tokens": out.tokens,
         "finish_reason": out.finish_reason, "commit_rate": out.commit_rate}
    if tokenizer is not None:
        d["text"] = tokenizer.decode(out.tokens, skip_special_tokens=True)
    return d

