"""`pipo-export bench` pieces on the session exports (the full bench is a benchmark, not a test)."""
from __future__ import annotations

import pytest

from pipo_export.bench.run import METHODS, BenchOptions, bench_contexts, markdown, ratios
from pipo_export.bench.measure import cache_bytes, decode_bytes, memory_bandwidth_gbs
from pipo_graphs.manifest import load_manifest


def test_bench_contexts_report(ref_model, ort_export, regular_export):
    opts = BenchOptions(contexts=[40, 130], new_tokens=6, repeats=1, threshold=0.5)
    rows = bench_contexts(ref_model, ort_export, regular_export, opts)
    assert list(rows) == ["40", "130"]
    for row in rows.values():
        for m in METHODS:
            assert row[m]["ttft_ms"]["median"] > 0 and row[m]["tpot_ms"]["median"] > 0
        assert row["pipo"]["commit_rate"] == 1.0  # tau < 0 keeps every token2
        assert row["regular"]["commit_rate"] == 0.0
    report = {"shape": "tiny-ref", "layers": 4, "parameters": 1, "new_tokens": 6,
              "machine": {"copy_bandwidth_gbs": 10.0, "threads": 2}, "contexts": rows,
              "ratios": {c: ratios(r) for c, r in rows.items()}}
    table = markdown(report)
    assert table.count("| 130 |") == len(METHODS) and "regular/PIPO TTFT" in table


def test_decode_bytes_by_part(ref_model, ort_export, regular_export):
    pipo, regular = load_manifest(ort_export), load_manifest(regular_export)
    v, h = ref_model.config.vocab_size, ref_model.config.text.hidden_size
    a, b = decode_bytes(ref_model, pipo, 100), decode_bytes(ref_model, regular, 200)
    assert a["lm_head"] == 2 * v * h * 4 and b["lm_head"] == v * h * 4  # token1 + token2
    assert "pipo_heads" in a and "pipo_heads" not in b
    assert a["backbone_layers"] == b["backbone_layers"]
    # a PIPO slot is a pair: 100 pair slots of 1 attention layer + the MTP cache = 200 token slots
    kv = 2 * 2 * 16 * 4  # K and V, 2 heads of 16, float32
    assert cache_bytes(pipo, 100) - cache_bytes(pipo, 0) == 100 * kv * 2 + 100  # + mask bytes
    assert cache_bytes(regular, 200) - cache_bytes(regular, 0) == 200 * kv + 200


def test_bandwidth_positive():
    assert memory_bandwidth_gbs(mib=16, repeats=2) > 0.1


def test_bench_rejects_bad_options(tmp_path):
    from pipo_export.bench.run import run_bench
    from pipo_graphs.errors import PipoUserError
    with pytest.raises(PipoUserError, match="unknown shape"):
        run_bench(BenchOptions(shape="huge", workdir=str(tmp_path)))
    with pytest.raises(PipoUserError, match="layers"):
        run_bench(BenchOptions(shape="tiny", layers=99, workdir=str(tmp_path)))
    assert not any(tmp_path.iterdir())
