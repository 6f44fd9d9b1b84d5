"""llama.cpp's convert_hf_to_gguf.py with a pre-tokenizer fallback; executed by the llamacpp
peer venv's python as a script:

    python gguf_child.py --llama-dir LLAMA --pre qwen35 -- HF --outfile F.gguf --outtype f16 --no-mtp

The converter hashes the token ids of a fixed probe text to name the pre-tokenizer; any
synthetic vocabulary has an unknown hash (ids differ even with Qwen3.5's regex) and
get_vocab_base_pre() raises. Here the real table is asked first and only an unknown hash returns
--pre (qwen35: Qwen3.5's regex), with FALLBACK_MARK in the log. No vendored file is edited; a real
Qwen3.5 tokenizer hits its table entry and is unaffected.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FALLBACK_MARK = "pre-tokenizer hash unknown"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gguf_child.py")
    ap.add_argument("--llama-dir", type=Path, required=True)
    ap.add_argument("--pre", default="qwen35")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    sys.path.insert(0, str(a.llama_dir.resolve()))
    import convert_hf_to_gguf as converter  # also puts the vendored gguf-py on sys.path
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            converter.logger.warning("%s (synthetic tokenizer): writing tokenizer.ggml.pre = %r",
                                     FALLBACK_MARK, a.pre)
            return a.pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *rest]
    converter.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
