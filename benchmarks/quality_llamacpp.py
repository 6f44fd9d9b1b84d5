"""llama.cpp's own quantization error on a PIPO checkpoint's backbone: Q4_K_M (and Q8_0) against
its f16 by llama-perplexity's KL divergence (issue 23), beside our int4 against our float32.

    PYTHONPATH=. python -m benchmarks.quality_llamacpp tests/data/pipo-fixture \
        --peers-root build/peers --work build/quality-llamacpp \
        --ours benchmarks/results/quality-fixture.json \
        --json benchmarks/results/quality-llamacpp-fixture.json

Uses the llama.cpp peer `python -m benchmarks.peers` made under PEERS_ROOT/llamacpp (venv, source,
llama-quantize, llama-perplexity); builds nothing. Steps:
1. the regular backbone (`--mode regular`: tokens embedded one by one, no compressor, MTP or gate)
   as a Hugging Face folder: every tensor but compressor.*/confidence_head.*, byte for byte; a
   text-only checkpoint (qwen3_5_text, model.*) as `Qwen3_5ForCausalLM`, a released multimodal
   one as `Qwen3_5ForConditionalGeneration` (hf_folder.base_config): conversion/qwen.py registers
   both to Qwen3_5TextModel. The checkpoint's tokenizer.json is kept (llama-perplexity tokenizes
   the text itself) with a tokenizer_config.json without BOS;
2. convert_hf_to_gguf.py --outtype f16 --no-mtp via gguf_child --pre gpt-2 (a trained byte-level
   BPE has no known hash; `gpt-2` is llama.cpp's ByteLevel GPT-2 regex), llama-quantize per type;
3. `llama-perplexity -m f16.gguf -f TEXT --kl-divergence-base base.kld -c 512 -t 2`, then per type
   `llama-perplexity -m TYPE.gguf --kl-divergence-base base.kld --kl-divergence -c 512 -t 2`;
4. the ids llama.cpp stored in base.kld against `tokenizers`' encoding of the text (match rate);
5. (anchor) KL(our float32 backbone in torch || llama.cpp f16) from base.kld's log-probs.

What is compared with what. llama.cpp: regular mode; floor(tokens / 512) chunks of 512 tokens
(the rest dropped), each from an empty cache, scoring only positions 256..510 of each (255
predictions with >= 256 tokens of context): `const int first = n_ctx/2` in kl_divergence()
(tools/perplexity/perplexity.cpp). No flag scores the whole window: --ppl-stride only reaches
plain perplexity (perplexity_v2), not --kl-divergence. KL(f16 || Q) sums over tokens with f16
log-prob > -16 from log-probs stored at 16 bits (resolution ~1e-5 per position; it can dip below
0). Ours (benchmarks/quality.py, `pipo-export eval --context 512`): PIPO mode, windows of 512
tokens (the last shorter one kept), every pair position scored (255 per window, contexts of
2..510 tokens), KL(float32 || int4) of token 1 (the backbone's prediction) in float64 over the
whole vocabulary. Both count ~255 predictions per 512 tokens, but ours include the short contexts
llama.cpp skips, and the inputs differ: pair latents (what the backbone was fine-tuned on) for
ours, single-token embeddings for llama.cpp (hence its higher perplexity). The references differ
too (f16 vs float32); the anchor measures how much.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.peers import PeerUnavailable
from benchmarks.peers.hf_folder import INDEX, base_config, checkpoint_files, copy_weights, pipo_ids
from benchmarks.peers.llamacpp import convert
from benchmarks.peers.venvs import LLAMA_CPP_PYTHON, PeerEnv, build_commit, run_logged

PRE = "gpt-2"
TEXT_ARCHITECTURE = "Qwen3_5ForCausalLM"
KEYS = {  # llama-perplexity's statistics labels (spaces collapsed) -> JSON keys
    "Mean PPL(Q)": "ppl_q", "Mean PPL(base)": "ppl_base",
    "Cor(ln(PPL(Q)), ln(PPL(base)))": "ln_ppl_correlation_pct",
    "Mean ln(PPL(Q)/PPL(base))": "ln_ppl_ratio", "Mean PPL(Q)/PPL(base)": "ppl_ratio",
    "Mean KLD": "kld_mean", "Maximum KLD": "kld_max", "99.9% KLD": "kld_p99_9",
    "99.0% KLD": "kld_p99", "95.0% KLD": "kld_p95", "90.0% KLD": "kld_p90",
    "Median KLD": "kld_median", "Minimum KLD": "kld_min", "RMS Δp": "rms_dp_pct",
    "Same top p": "same_top_p_pct"}
REQUIRED = ("ppl_q", "ppl_base", "ln_ppl_ratio", "kld_mean", "kld_median", "kld_p90", "kld_p95",
            "kld_p99", "kld_max", "same_top_p_pct")
STAT = re.compile(r"^\s*(?P<label>[^:]+?)\s*:\s*(?P<value>[-+]?(?:\d+\.?\d*|nan|inf))\s*%?"
                  r"\s*(?:±\s*(?P<unc>[-+]?(?:\d+\.?\d*|nan|inf))\s*%?)?\s*$")
GGUF_TYPES = ("import json, sys, collections, gguf\nr = gguf.GGUFReader(sys.argv[1])\n"
              "n = collections.Counter(); b = 0\nfor t in r.tensors:\n"
              "    n[t.tensor_type.name] += int(t.n_elements); b += int(t.n_bytes)\n"
              "f = r.get_field('tokenizer.ggml.pre')\n"
              "print(json.dumps({'params': dict(n), 'tensor_bytes': b, 'pre': "
              "bytes(f.parts[f.data[0]]).decode() if f else None}))\n")


@dataclass
class LlamaKlOptions:
    checkpoint: str
    work: str = "build/quality-llamacpp"
    peers_root: str = "build/peers"
    text: str | None = None  # default: CHECKPOINT/heldout.txt
    types: list[str] = field(default_factory=lambda: ["Q4_K_M", "Q8_0"])
    context: int = 512
    threads: int = 2
    pre: str = PRE
    ours: str | None = None  # benchmarks/quality.py --json output, shown beside
    anchor: bool = True  # KL(our float32 regular backbone || llama.cpp f16): the conversion check
    force: bool = False


def log(text: str) -> None:
    print(f"[quality-llamacpp] {text}", file=sys.stderr, flush=True)


def peer_env(root: Path) -> PeerEnv:
    """The llama.cpp peer as venvs.ensure_llamacpp left it; PeerUnavailable when incomplete."""
    venv = root.resolve() / "llamacpp"
    llama = venv / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    tools = {t: venv / "build" / "bin" / t for t in ("llama-quantize", "llama-perplexity")}
    missing = [str(p) for p in [venv / "bin" / "python", llama / "convert_hf_to_gguf.py",
                                *tools.values()] if not p.exists()]
    if missing:
        raise PeerUnavailable(f"llama.cpp peer incomplete (make it with `python -m "
                              f"benchmarks.peers`): missing {', '.join(missing)}")
    return PeerEnv("llama.cpp", venv / "bin" / "python",
                   {"llama.cpp": build_commit(venv / "build")}, llama, tools)


def write_backbone_folder(checkpoint: Path, out: Path, force: bool = False) -> Path:
    """The backbone's HF folder (module doc, step 1); reused when complete unless force."""
    from pipo_export.fsutil import atomic_dir
    if not force and (out / INDEX).is_file() and (out / "tokenizer_config.json").is_file():
        return out
    tokenizer = checkpoint / "tokenizer.json"
    if not tokenizer.is_file():
        raise PeerUnavailable(f"{checkpoint} has no tokenizer.json: llama-perplexity tokenizes "
                              "the text with the model's own vocabulary")
    config = json.loads((checkpoint / "config.json").read_text())
    with atomic_dir(out, force=True) as tmp:
        copy_weights(checkpoint_files(checkpoint), tmp, 2 * 10**9)
        has_mtp = any(k.startswith("mtp.") for k in
                      json.loads((tmp / INDEX).read_text())["weight_map"])
        if "text_config" in config:
            base = base_config(config, has_mtp)
        else:
            base = {k: v for k, v in config.items() if k != "compressor_type"}
            base["architectures"] = [TEXT_ARCHITECTURE]
        (tmp / "config.json").write_text(json.dumps(base, indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        names = {t["id"]: t["content"] for t in json.loads(tokenizer.read_text())["added_tokens"]}
        pad, eos = pipo_ids(config)
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
            "eos_token": names.get(eos[0]) if eos else None, "pad_token": names.get(pad),
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    return out


def parse_kld(text: str) -> dict:
    """llama-perplexity --kl-divergence output -> its summary statistics (KEYS; `*_unc` for the
    ± figures) and the chunks scored; ValueError when a REQUIRED figure is missing."""
    out: dict = {}
    found = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    if found:
        out["chunks"], out["n_ctx"] = int(found.group(1)), int(found.group(2))
        out["scored_tokens"] = out["chunks"] * (out["n_ctx"] - 1 - out["n_ctx"] // 2)
    _, sep, stats = text.partition("====== Perplexity statistics ======")
    for line in stats.splitlines() if sep else ():
        m = STAT.match(line)
        key = KEYS.get(" ".join(m.group("label").split())) if m else None
        if key:
            out[key] = float(m.group("value"))
            if m.group("unc") is not None:
                out[key + "_unc"] = float(m.group("unc"))
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        raise ValueError(f"llama-perplexity output lacks {', '.join(missing)} (it prints no "
                         "statistics below 100 scored tokens, or the run failed)")
    return out


def parse_base(text: str) -> dict:
    """The f16 run's `Final estimate: PPL = X +/- Y` (all of each chunk's second half)."""
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)
    if not found:
        raise ValueError("llama-perplexity printed no final PPL estimate")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", text)
    return {"ppl": float(found.group(1)), "ppl_unc": float(found.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None}


def kld_tokens(path: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_vocab, token ids) of a --kl-divergence-base file: `_logits_`, n_ctx, n_vocab,
    n_chunk (int32 each), n_chunk * n_ctx int32 ids, then per scored position 2 float32 (scale,
    min log-prob) and n_vocab uint16 (padded to even): log p = scale * q + min."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(f.read(12), np.int32))
        return n_ctx, n_vocab, np.frombuffer(f.read(4 * n_ctx * n_chunk), np.int32)


def anchor(checkpoint: Path, kld_file: Path, batch: int = 4) -> dict:
    """KL(our float32 regular backbone || llama.cpp f16) at llama.cpp's scored positions, from
    the f16 log-probs in kld_file: is llama.cpp's f16 our backbone? (torch, transformers'
    Qwen3_5ForCausalLM on the checkpoint's modules, as `pipo-export bench`'s reference.)"""
    import torch

    from pipo_export import load_checkpoint
    from pipo_export.bench.hf_baseline import hf_causal_lm
    from pipo_export.eval.metrics import log_softmax
    n_ctx, n_vocab, ids = kld_tokens(kld_file)
    first, chunks = n_ctx // 2, ids.reshape(-1, n_ctx).astype(np.int64)
    per, nv = n_ctx - 1 - first, n_vocab + n_vocab % 2 + 4
    rows = np.memmap(kld_file, np.uint16, "r", 20 + ids.nbytes).reshape(-1, nv)
    lm, kl, nll, agree = hf_causal_lm(load_checkpoint(checkpoint)), [], [], []
    with torch.no_grad():
        for s in range(0, len(chunks), batch):
            x = chunks[s:s + batch]
            ours = log_softmax(lm(input_ids=torch.from_numpy(x)).logits[:, first:n_ctx - 1]
                               .float().numpy().reshape(-1, n_vocab))
            r = np.asarray(rows[s * per:(s + len(x)) * per])
            d = np.ascontiguousarray(r[:, :4]).view(np.float32).astype(np.float64)
            theirs = d[:, :1] * r[:, 4:4 + n_vocab] + d[:, 1:2]
            kl.append((np.exp(ours) * (ours - theirs)).sum(-1))
            nll.append(-np.take_along_axis(ours, x[:, first + 1:].reshape(-1, 1), 1)[:, 0])
            agree.append(ours.argmax(-1) == theirs.argmax(-1))
    kl, nll = np.concatenate(kl), np.concatenate(nll)
    return {"positions": int(kl.size), "ppl_float32": float(np.exp(nll.mean())),
            "kld_mean": float(kl.mean()), "kld_median": float(np.median(kl)),
            **{f"kld_p{p}": float(np.percentile(kl, p)) for p in (90, 95, 99)},
            "kld_max": float(kl.max()), "same_top_p_pct": 100 * float(np.concatenate(agree).mean())}


def tokenization_match(tokenizer_json: Path, text: str, llama_ids: np.ndarray) -> dict:
    """llama.cpp's ids against tokenizers' on the same text (its first len(llama_ids) ids)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_json))
    ours = np.asarray(tok.encode(text, add_special_tokens=False).ids[:len(llama_ids)], np.int64)
    n = min(len(ours), len(llama_ids))
    same = ours[:n] == llama_ids[:n]
    first = int(np.argmin(same)) if not same.all() else None
    out = {"compared": int(n), "equal_positions": int(same.sum()),
           "match_rate": float(same.mean()) if n else 0.0, "first_mismatch": first}
    if first is not None:
        window = slice(max(0, first - 3), first + 4)
        out["at_first_mismatch"] = {"tokenizers": [tok.id_to_token(int(i)) for i in ours[window]],
                                    "llama.cpp": [tok.id_to_token(int(i))
                                                  for i in llama_ids[window]]}
    return out


def perplexity(env: PeerEnv, args: list, logfile: Path) -> str:
    logfile.unlink(missing_ok=True)
    run_logged([env.tools["llama-perplexity"], *args], logfile, f"llama-perplexity {logfile.stem}")
    return logfile.read_text(errors="replace")


def gguf_facts(env: PeerEnv, path: Path) -> dict:
    """Tensor types (parameters per ggml type), bits per weight, tokenizer.ggml.pre."""
    import subprocess
    proc = subprocess.run([str(env.python), "-c", GGUF_TYPES, str(path)], capture_output=True,
                          text=True, check=True)
    facts = json.loads(proc.stdout)
    facts["bits_per_weight"] = 8 * facts["tensor_bytes"] / sum(facts["params"].values())
    return facts


def run(opts: LlamaKlOptions) -> dict:
    env, work = peer_env(Path(opts.peers_root)), Path(opts.work).resolve()
    checkpoint = Path(opts.checkpoint)
    text = Path(opts.text or checkpoint / "heldout.txt").resolve()
    hf = write_backbone_folder(checkpoint, work / "hf", opts.force)
    log(f"backbone folder {hf}")
    if opts.force:
        shutil.rmtree(work / "gguf", ignore_errors=True)
    ggufs = {t: convert(env, hf, work / "gguf", t, pre=opts.pre) for t in ["f16", *opts.types]}
    facts = {t: gguf_facts(env, g.path) for t, g in ggufs.items()}
    common = ["-c", str(opts.context), "-t", str(opts.threads)]
    base_file = work / "base.kld"
    base = parse_base(perplexity(env, ["-m", ggufs["f16"].path, "-f", text, "--kl-divergence-base",
                                       base_file, *common], work / "ppl-f16.log"))
    log(f"f16 PPL {base['ppl']:.4f}")
    _, _, ids = kld_tokens(base_file)
    tokens = tokenization_match(hf / "tokenizer.json", text.read_text(encoding="utf-8"), ids)
    log(f"tokenization match {tokens['match_rate']:.4%} of {tokens['compared']} ids")
    fidelity = anchor(checkpoint, base_file) if opts.anchor else None
    rows = {}
    for t in opts.types:
        rows[t] = parse_kld(perplexity(env, ["-m", ggufs[t].path, "--kl-divergence-base",
                                             base_file, "--kl-divergence", *common],
                                       work / f"kld-{t}.log"))
        log(f"{t}: mean KLD {rows[t]['kld_mean']:.6f}")
    return {"checkpoint": str(checkpoint), "text": str(text), "settings": vars(opts),
            "llama_cpp": {"commit": env.versions["llama.cpp"], "pre": opts.pre,
                          "pre_in_gguf": facts["f16"]["pre"],
                          "pre_fallback": ggufs["f16"].pre_tokenizer_fallback},
            "gguf": {t: {"path": str(g.path), "bytes": g.bytes, **facts[t]}
                     for t, g in ggufs.items()},
            "tokenization": tokens, "base_f16": base, "anchor": fidelity, "rows": rows,
            "ours": json.loads(Path(opts.ours).read_text()) if opts.ours else None}


def markdown(report: dict) -> str:
    """llama.cpp's rows, then ours from quality.py's JSON (token 1, int rows) when given."""
    lines = ["| weights | bits/weight | PPL | ref PPL | ln(PPL/ref) | KL mean | KL median | "
             "KL p90 | KL p99 | KL max | same top-1 |", "|" + "---|" * 11]
    for t, r in report["rows"].items():
        lines.append(
            f"| llama.cpp {t} vs f16 | {report['gguf'][t]['bits_per_weight']:.2f} | "
            f"{r['ppl_q']:.3f} | {r['ppl_base']:.3f} | {r['ln_ppl_ratio']:+.5f} | "
            f"{r['kld_mean']:.2e} | {r['kld_median']:.2e} | {r['kld_p90']:.2e} | "
            f"{r['kld_p99']:.2e} | {r['kld_max']:.2e} | {r['same_top_p_pct']:.2f}% |")
    a = report.get("anchor")
    if a:
        lines.append(f"| llama.cpp f16 vs our float32 (regular) | 16 | "
                     f"{report['base_f16']['ppl']:.3f} | {a['ppl_float32']:.3f} | - | "
                     + " | ".join(f"{a[k]:.2e}" for k in ("kld_mean", "kld_median", "kld_p90",
                                                           "kld_p99", "kld_max"))
                     + f" | {a['same_top_p_pct']:.2f}% |")
    peer = report["rows"].get("Q4_K_M")
    for label, row in ((report.get("ours") or {}).get("rows") or {}).items():
        ref = row["eval"].get("reference")
        if label == "float32" or not ref:
            continue
        kl = ref["kl"]["token1"]
        verdict = "" if not peer else (" (<= Q4_K_M)" if kl["mean"] <= peer["kld_mean"]
                                       else " (> Q4_K_M)")
        lines.append(
            f"| ours {label} vs float32, token 1 | - | "
            f"{row['eval']['perplexity']['token1']:.3f} | {ref['perplexity']['token1']:.3f} | "
            f"{ref['ln_ppl_ratio']['token1']:+.5f} | "
            f"{kl['mean']:.2e}{verdict} | {kl['p50']:.2e} | {kl['p90']:.2e} | {kl['p99']:.2e} | "
            f"{kl['max']:.2e} | {ref['top1_agreement']['token1']:.2%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = LlamaKlOptions(checkpoint="")
    ap.add_argument("checkpoint")
    ap.add_argument("--work", default=d.work)
    ap.add_argument("--peers-root", default=d.peers_root, help="benchmarks.peers' build root")
    ap.add_argument("--text", default=None, help="default: CHECKPOINT/heldout.txt")
    ap.add_argument("--types", default=",".join(d.types), help="llama-quantize types, compared "
                    "with f16")
    ap.add_argument("--context", type=int, default=d.context)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--pre", default=d.pre, help="tokenizer.ggml.pre for an unknown tokenizer hash")
    ap.add_argument("--ours", default=None, metavar="F", help="benchmarks/quality.py --json output")
    ap.add_argument("--no-anchor", action="store_true", help="skip the float32 (torch) check of "
                    "llama.cpp's f16")
    ap.add_argument("--force", action="store_true", help="rewrite the folder and GGUF files")
    ap.add_argument("--json", default=None, metavar="F")
    a = ap.parse_args(argv)
    opts = LlamaKlOptions(a.checkpoint, a.work, a.peers_root, a.text,
                          [t.strip() for t in a.types.split(",") if t.strip()], a.context,
                          a.threads, a.pre, a.ours, not a.no_anchor, a.force)
    try:
        report = run(opts)
    except PeerUnavailable as exc:
        print(f"quality_llamacpp: {exc}", file=sys.stderr)
        return 2
    print(markdown(report))
    t = report["tokenization"]
    print(f"\ntokenization: llama.cpp = tokenizers on {t['equal_positions']:,} of "
          f"{t['compared']:,} ids ({t['match_rate']:.4%})")
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in report.items() if k != "ours"},
                                           indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
