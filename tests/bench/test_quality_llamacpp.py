"""benchmarks/quality_llamacpp.py without llama.cpp: parsing llama-perplexity's output (a captured
run), the logits file's token ids, the tokenization check, the backbone's HF folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality_llamacpp import (anchor, kld_tokens, parse_base, parse_kld,
    tokenization_match, write_backbone_folder)

# captured: llama-perplexity (llama.cpp 0c1e570) --kl-divergence of the fixture's Q4_K_M against
# its f16 (benchmarks/quality_llamacpp.py); chunk rows 3..123 and the model-loading lines cut
KLD_SAMPLE = """\
0.00.136.872 I kl_divergence: computing over 124 chunks, n_ctx=512, batch_size=2048, n_seq=4

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1     344.6520 ±   51.4457       0.02181 ±    0.00900       0.00787 ±    0.00035     0.428 ±  0.123 %    87.059 ±  2.106 %
   2     297.8853 ±   29.5457       0.02030 ±    0.00612       0.00813 ±    0.00026     0.656 ±  0.144 %    85.098 ±  1.578 %
  ...
 124     149.5958 ±    1.9917       0.00381 ±    0.00082       0.00874 ±    0.00005     1.127 ±  0.020 %    89.497 ±  0.172 %

====== Perplexity statistics ======
Mean PPL(Q)                   : 149.595784 ±   1.991713
Mean PPL(base)                : 149.026224 ±   1.986205
Cor(ln(PPL(Q)), ln(PPL(base))):  99.81%
Mean ln(PPL(Q)/PPL(base))     :   0.003815 ±   0.000823
Mean PPL(Q)/PPL(base)         :   1.003822 ±   0.000826
Mean PPL(Q)-PPL(base)         :   0.569560 ±   0.123018

====== KL divergence statistics ======
Mean    KLD:   0.008744 ±   0.000051
Maximum KLD:   0.241471
99.9%   KLD:   0.088362
99.0%   KLD:   0.043749
95.0%   KLD:   0.024042
90.0%   KLD:   0.017906
Median  KLD:   0.006284
10.0%   KLD:   0.001937
 5.0%   KLD:   0.001443
 1.0%   KLD:   0.000737
 0.1%   KLD:   0.000140
Minimum KLD:   0.000038

====== Token probability statistics ======
Mean    Δp: -0.038 ± 0.006 %
Maximum Δp: 11.669%
99.9%   Δp:  7.409%
99.0%   Δp:  3.491%
95.0%   Δp:  1.054%
90.0%   Δp:  0.447%
75.0%   Δp:  0.042%
Median  Δp: -0.000%
25.0%   Δp: -0.047%
10.0%   Δp: -0.482%
 5.0%   Δp: -1.346%
 1.0%   Δp: -4.187%
 0.1%   Δp: -9.295%
Minimum Δp: -21.582%
RMS Δp    :  1.127 ± 0.020 %
Same top p: 89.497 ± 0.172 %
"""
KLD_EXPECTED = {
    "chunks": 124, "n_ctx": 512, "scored_tokens": 124 * 255,
    "ppl_q": 149.595784, "ppl_q_unc": 1.991713, "ppl_base": 149.026224, "ppl_base_unc": 1.986205,
    "ln_ppl_correlation_pct": 99.81, "ln_ppl_ratio": 0.003815, "ln_ppl_ratio_unc": 0.000823,
    "ppl_ratio": 1.003822, "ppl_ratio_unc": 0.000826,
    "kld_mean": 0.008744, "kld_mean_unc": 0.000051, "kld_max": 0.241471, "kld_p99_9": 0.088362,
    "kld_p99": 0.043749, "kld_p95": 0.024042, "kld_p90": 0.017906, "kld_median": 0.006284,
    "kld_min": 0.000038, "rms_dp_pct": 1.127, "rms_dp_pct_unc": 0.020,
    "same_top_p_pct": 89.497, "same_top_p_pct_unc": 0.172}
# the same run's f16 pass that wrote the base logits (the per-chunk list cut)
BASE_SAMPLE = """\
0.01.045.030 I perplexity: calculating perplexity over 124 chunks, n_ctx=512, batch_size=2048, n_seq=4
0.04.385.575 I perplexity: 3.34 seconds per pass - ETA 1.72 minutes
[1]337.2168,[2]291.8963,[3]294.5609,[4]293.5452,...,[124]149.0262,
1.08.334.907 I Final estimate: PPL = 149.0262 +/- 1.98620
"""


BASE_EXPECTED = {"ppl": 149.0262, "ppl_unc": 1.98620, "chunks": 124}


def test_parse_kld_captured_run():
    r = parse_kld(KLD_SAMPLE)
    assert r == pytest.approx(KLD_EXPECTED)


def test_parse_kld_fails_without_statistics():
    head, _, _ = KLD_SAMPLE.partition("====== KL divergence statistics ======")
    with pytest.raises(ValueError, match="kld_mean"):
        parse_kld(head)  # cut before the KL block: no mean, no percentiles
    with pytest.raises(ValueError, match="ppl_q"):
        parse_kld(KLD_SAMPLE.replace("====== Perplexity statistics ======", ""))
    with pytest.raises(ValueError, match="same_top_p_pct"):
        parse_kld(KLD_SAMPLE.replace("Same top p:", "Same top:"))


def test_parse_base_captured_run():
    assert parse_base(BASE_SAMPLE) == pytest.approx(BASE_EXPECTED)
    with pytest.raises(ValueError):
        parse_base(BASE_SAMPLE.replace("Final estimate", "estimate"))


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny text-layout checkpoint (model.*, qwen3_5_text, its byte-level BPE tokenizer)."""
    import torch

    from pipo_export.model.synthetic import TinyLayout, write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pipo") / "ckpt",
                                 TinyLayout(weight_dtype=torch.bfloat16))


def test_logits_file_ids_and_tokenization_match(tiny_text, tmp_path):
    from tokenizers import Tokenizer
    text = "PIPO folds each pair of input tokens into one latent, and unfolds it again. " * 8
    ids = Tokenizer.from_file(str(tiny_text / "tokenizer.json")).encode(text).ids
    n_ctx = 16
    ids = np.asarray(ids[:len(ids) // n_ctx * n_ctx], np.int32)
    path = tmp_path / "base.kld"  # llama-perplexity's header, the ids, (log-probs not read)
    path.write_bytes(b"_logits_" + np.asarray([n_ctx, 512, len(ids) // n_ctx], np.int32)
                     .tobytes() + ids.tobytes() + b"\0" * 64)
    got_ctx, got_vocab, got = kld_tokens(path)
    assert (got_ctx, got_vocab) == (n_ctx, 512) and np.array_equal(got, ids)
    same = tokenization_match(tiny_text / "tokenizer.json", text, got)
    assert same["match_rate"] == 1.0 and same["first_mismatch"] is None
    assert same["compared"] == len(ids)
    off = got.copy()
    off[5] = (off[5] + 1) % 500
    diff = tokenization_match(tiny_text / "tokenizer.json", text, off)
    assert diff["first_mismatch"] == 5 and diff["equal_positions"] == len(ids) - 1
    assert len(diff["at_first_mismatch"]["llama.cpp"]) == 7
    with pytest.raises(ValueError):
        (tmp_path / "bad").write_bytes(b"_logitz_" + bytes(12))
        kld_tokens(tmp_path / "bad")


def test_backbone_folder_text_layout(tiny_text, tmp_path):
    from safetensors import safe_open
    out = write_backbone_folder(tiny_text, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"]
    assert config["model_type"] == "qwen3_5_text" and "compressor_type" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in index and any(k.startswith("mtp.") for k in index)
    assert not any(k.startswith(("compressor.", "confidence_head.")) for k in index)
    with safe_open(str(tiny_text / "model.safetensors"), "pt") as a, \
            safe_open(str(out / index["model.layers.0.mlp.up_proj.weight"]), "pt") as b:
        key = "model.layers.0.mlp.up_proj.weight"
        assert a.get_tensor(key).equal(b.get_tensor(key))  # byte for byte, bf16
    assert (out / "tokenizer.json").read_bytes() == (tiny_text / "tokenizer.json").read_bytes()
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is False and tc["bos_token"] is None
    assert tc["eos_token"] == "<|eos|>" and tc["pad_token"] == "<|pad|>"


def llama_log_probs(logits: np.ndarray) -> bytes:
    """perplexity.cpp's log_softmax() record of each row: scale, min log-prob, uint16 codes."""
    out = []
    for row in logits.astype(np.float32):
        hi, lo = row.max(), max(row.min(), row.max() - 16)
        lse = np.log(np.exp(row - hi).sum())
        scale = np.float32((hi - lo) / 65535)
        q = np.where(row > lo, np.rint((row - lo) / scale), 0).astype(np.uint16)
        pad = np.zeros(len(row) % 2, np.uint16)
        out.append(np.asarray([scale, lo - hi - lse], np.float32).tobytes() + q.tobytes()
                   + pad.tobytes())
    return b"".join(out)


def test_anchor_reads_llamas_log_probs(tiny_text, tmp_path):
    """A logits file holding our own float32 scores (in llama.cpp's 16-bit code) is our model:
    KL ~ 0, same top-1 everywhere; shifted by one position it is not."""
    import torch

    from pipo_export import load_checkpoint
    from pipo_export.bench.hf_baseline import hf_causal_lm
    n_ctx, vocab = 32, 320
    ids = np.random.default_rng(0).integers(0, 300, (3, n_ctx)).astype(np.int32)
    with torch.no_grad():
        logits = hf_causal_lm(load_checkpoint(tiny_text))(
            input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    head = (b"_logits_" + np.asarray([n_ctx, vocab, len(ids)], np.int32).tobytes()
            + ids.tobytes())
    scored = logits[:, n_ctx // 2:n_ctx - 1].reshape(-1, vocab)
    (tmp_path / "base.kld").write_bytes(head + llama_log_probs(scored))
    a = anchor(tiny_text, tmp_path / "base.kld", batch=2)
    assert a["positions"] == 3 * 15 and a["same_top_p_pct"] == 100.0
    assert abs(a["kld_mean"]) < 1e-5 and a["kld_max"] < 1e-4  # the 16-bit code: ~1e-4 in log p
    nll = -torch.log_softmax(torch.from_numpy(logits[:, 16:31]).double(), -1).gather(
        -1, torch.from_numpy(ids[:, 17:].astype(np.int64))[..., None]).mean()
    assert a["ppl_float32"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    (tmp_path / "off.kld").write_bytes(head + llama_log_probs(np.roll(scored, 1, axis=0)))
    off = anchor(tiny_text, tmp_path / "off.kld")
    assert off["kld_mean"] > 1e-2


def test_markdown_puts_ours_beside():
    """Our rows come from quality.py's JSON: eval's real summary layout (metrics.Accumulator)."""
    from benchmarks.quality_llamacpp import markdown
    from pipo_export.eval.metrics import Accumulator, Scores
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 16, (2, 8))
    logits = rng.normal(size=(2, 3, 16))

    def summary(noise: float) -> dict:
        acc = Accumulator()
        acc.add(ids, Scores.from_logits(logits + noise * rng.normal(size=logits.shape), logits,
                                        np.full((2, 3), 0.9)),
                Scores.from_logits(logits, logits, np.full((2, 3), 0.9)))
        return {"eval": acc.summary()}
    report = {"rows": {"Q4_K_M": parse_kld(KLD_SAMPLE)}, "gguf": {"Q4_K_M": {
        "bits_per_weight": 5.39}}, "base_f16": BASE_EXPECTED, "anchor": None,
        "ours": {"rows": {"float32": summary(0.0), "int4 close": summary(0.01),
                          "int4 far": summary(1.0)}}}
    lines = markdown(report).splitlines()
    assert len(lines) == 2 + 1 + 2 and lines[2].startswith("| llama.cpp Q4_K_M vs f16 | 5.39 |")
    assert "(<= Q4_K_M)" in lines[3] and "ours int4 close" in lines[3]
    assert "(> Q4_K_M)" in lines[4]
