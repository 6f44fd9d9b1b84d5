"""The peers bench (`python -m benchmarks.peers`), the pieces that need no peer: llama-bench
JSON, the GenAI overlay, the plain Qwen3.5 folder, skipping a missing peer, interleaving, the
report, the command line. No timed run here."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.peers import BUSY_CORES, PeerUnavailable, Sample

LLAMA_ROW = {"build_commit": "0c1e570", "model_type": "qwen35 ?B F16", "model_size": 12585216,
             "model_n_params": 6271552, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
             "type_k": "f16", "type_v": "f16", "flash_attn": -1, "n_prompt": 256, "n_gen": 0,
             "n_depth": 0, "avg_ns": 78469521, "stddev_ns": 10712475, "avg_ts": 3309.3,
             "stddev_ts": 430.9, "samples_ns": [78469521]}


def test_parse_llama_bench_json():
    from benchmarks.peers.llamacpp import parse_bench, sample_from
    prefill = parse_bench(json.dumps([LLAMA_ROW]))
    assert prefill["samples_ns"] == [78469521] and prefill["n_prompt"] == 256
    assert "stddev_ts" not in prefill  # only the fields the report keeps
    decode = parse_bench(json.dumps([dict(LLAMA_ROW, n_prompt=0, n_gen=16, n_depth=256,
                                          samples_ns=[32_000_000])]))
    s = sample_from(prefill, decode, 16, 0.1)
    assert s.ttft_ms == pytest.approx(78.469521) and s.ms_per_token == pytest.approx(2.0)
    assert s.extra["decode_depth"] == 256 and not s.flagged
    for bad in ("llama-bench: error", json.dumps([LLAMA_ROW, LLAMA_ROW]),
                json.dumps([dict(LLAMA_ROW, samples_ns=[])])):
        with pytest.raises(PeerUnavailable):
            parse_bench(bad)


def test_genai_overlay_and_builder_options():
    from benchmarks.peers.ortgenai import builder_options
    from benchmarks.peers.ortgenai_child import overlay
    layer = overlay(2)
    assert layer == {"model": {"decoder": {"session_options": {
        "intra_op_num_threads": 2, "inter_op_num_threads": 1}}}}
    quiet = overlay(2, spin=False)["model"]["decoder"]["session_options"]
    assert quiet["session.intra_op.allow_spinning"] == "0"  # strings: ORT config entries
    assert json.loads(json.dumps(layer)) == layer
    released = {"model_type": "qwen3_5", "text_config": {"mtp_num_hidden_layers": 1}}
    assert builder_options(released) == ["prune_lm_head=true", "exclude_mtp=true"]
    assert builder_options({"model_type": "qwen3_5", "text_config": {}}) == ["prune_lm_head=true"]


@pytest.fixture(scope="module")
def tiny_pipo(tmp_path_factory):
    from pipo_export.model.synthetic import TinyLayout, write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pipo") / "ckpt",
                                 TinyLayout(multimodal=True, shards=2,
                                            weight_dtype=torch.bfloat16))


def test_hf_folder_from_tiny_checkpoint(tiny_pipo, tmp_path):
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from benchmarks.peers.hf_folder import write_hf_folder
    hf = write_hf_folder(tiny_pipo, tmp_path / "hf", shard_bytes=200_000)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # re-sharded
    assert not any(k.startswith(("compressor.", "confidence_head.")) for k in keys)
    assert {"compressor.mlp.0.weight", "confidence_head.fc1.weight"} <= set(hf.dropped)
    assert "model.language_model.embed_tokens.weight" in keys and any(
        k.startswith("mtp.") for k in keys) and "model.visual.patch_embed.proj.weight" in keys
    src = json.loads((tiny_pipo / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.language_model.layers.0.mlp.down_proj.weight"
    with safe_open(str(tiny_pipo / src[key]), "pt") as a, \
            safe_open(str(tmp_path / "hf" / index["weight_map"][key]), "pt") as b:
        x, y = a.get_tensor(key), b.get_tensor(key)
    assert y.dtype == torch.bfloat16 and torch.equal(x, y)  # the same weights, bit for bit

    pipo_config = json.loads((tiny_pipo / "config.json").read_text())
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    for k in ("compressor_type", "pad_token_id", "eos_token_id", "mtp_num_hidden_layers"):
        assert k in pipo_config and k not in config
    assert "compressor_type" not in config["text_config"]
    assert config["text_config"]["mtp_num_hidden_layers"] == 1  # mtp.* kept, as released

    vocab = config["text_config"]["vocab_size"]
    tok = Tokenizer.from_file(str(tmp_path / "hf/tokenizer.json"))
    assert tok.get_vocab_size() == vocab
    body = json.loads((tmp_path / "hf/tokenizer.json").read_text())
    assert len(body["model"]["merges"]) + 256 + len(body["added_tokens"]) == vocab
    assert tok.id_to_token(pipo_config["pad_token_id"]) == "<|endoftext|>"
    assert tok.id_to_token(pipo_config["eos_token_id"]) == "<|im_end|>"
    assert max(tok.encode("def f(x): return x").ids) < min(pipo_config["pad_token_id"],
                                                           pipo_config["eos_token_id"])
    assert write_hf_folder(tiny_pipo, tmp_path / "hf").reused


def test_hf_folder_refuses_a_flat_checkpoint(tmp_path):
    from benchmarks.peers.hf_folder import base_config
    from pipo_graphs.errors import PipoUserError
    with pytest.raises(PipoUserError, match="multimodal layout"):
        base_config({"model_type": "qwen3_5_text", "vocab_size": 320}, has_mtp=False)


@pytest.mark.parametrize("peer,label", [("ortgenai", "onnxruntime-genai"),
                                        ("llamacpp", "llama.cpp")])
def test_missing_peer_is_skipped_with_one_line(tmp_path, capsys, peer, label):
    from benchmarks.peers.suite import PeerBenchOptions, peer_methods
    skipped: list = []
    opts = PeerBenchOptions(peer_root=str(tmp_path / "missing"), install=False)
    methods, info = peer_methods(peer, tmp_path / "hf", tmp_path, opts, skipped)
    assert methods == [] and info == {} and len(skipped) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if "skipping" in x]
    assert len(lines) == 1 and lines[0].startswith(f"[bench] skipping {label}: ")
    assert "--no-peer-install" in lines[0] and not (tmp_path / "missing").exists()


def test_failed_install_raises_peer_unavailable(tmp_path):
    from benchmarks.peers.venvs import SetupOptions, ensure_ortgenai
    with pytest.raises(PeerUnavailable, match="creating venv"):
        ensure_ortgenai(SetupOptions(tmp_path, base_python=str(tmp_path / "no-python")))


def _method(key, peer, calls, fail=False):
    from benchmarks.peers.suite import Method

    def run(prompt, n):
        calls.append(key)
        if fail:
            raise PeerUnavailable(f"{key} broke")
        return Sample(10.0 + len(calls), 1.0, cpu_others=0.0)
    return Method(key, key.split("-")[0], key.split("-")[1], "x", 1, run, peer=peer)


def test_rounds_interleave_and_drop_a_failing_peer(capsys):
    from benchmarks.peers.suite import PeerBenchOptions, run_rounds
    calls: list = []
    methods = [_method("pipo-fp32", False, calls), _method("regular-fp32", False, calls),
               _method("ortgenai-int4", True, calls, fail=True)]
    opts = PeerBenchOptions(contexts=[8, 16], repeats=2, wait_idle=0, retries=0)
    skipped: list = []
    out = run_rounds(methods, opts, lambda c: list(range(c)), skipped)
    assert calls[:3] == ["pipo-fp32", "regular-fp32", "ortgenai-int4"]
    assert calls[3:5] == ["regular-fp32", "pipo-fp32"]  # rotated by one; the peer is gone
    assert set(out["8"]) == {"pipo-fp32", "regular-fp32"} and len(out["16"]["pipo-fp32"]) == 2
    assert [s["what"] for s in skipped] == ["ortgenai int4"]
    assert "skipping ortgenai int4: ortgenai-int4 broke" in capsys.readouterr().err
    with pytest.raises(PeerUnavailable):  # our own methods' errors are bugs: they propagate
        run_rounds([_method("pipo-fp32", False, [], fail=True)], opts, lambda c: [1], [])


def test_disturbed_measurement_is_retried_and_flagged():
    from benchmarks.peers.suite import Method, PeerBenchOptions, measure_clean
    loads = iter([0.9, 0.5])
    method = Method("llamacpp-f16", "llama.cpp", "f16", "x", 1,
                    lambda p, n: Sample(1.0, 1.0, cpu_others=next(loads)), peer=True)
    s = measure_clean(method, [1], PeerBenchOptions(wait_idle=0, retries=1))
    assert s.cpu_others == 0.5 and s.flagged and s.extra["attempt"] == 2 and BUSY_CORES < 0.5


def test_report_table_bounds_and_flags():
    from benchmarks.peers import report
    from benchmarks.peers.suite import Method, PeerBenchOptions
    opts = PeerBenchOptions(contexts=[256], repeats=2, new_tokens=16)
    keys = ["pipo-int4", "regular-int4", "llamacpp-Q4_K_M", "ortgenai-int4"]
    methods = [Method(k, {"pipo": "pipo-export PIPO", "regular": "pipo-export regular"}.get(
        k.split("-")[0], k.split("-")[0]), k.split("-", 1)[1], "x", 10**6, None) for k in keys]
    times = {"pipo-int4": (50, 5.0), "regular-int4": (120, 8.0), "llamacpp-Q4_K_M": (90, 10.0),
             "ortgenai-int4": (200, 9.0)}
    results = {"256": {k: [Sample(t, m, cpu_others=0.3 if k == "ortgenai-int4" else 0.0),
                           Sample(t * 1.1, m * 1.1)] for k, (t, m) in times.items()}}
    bounds = {"256": {"int4": {"pipo": {"total": 1.0e9}, "regular": {"total": 0.8e9}}}}
    doc = report.build(opts, {"num_hidden_layers": 4}, methods, results, bounds, [
        {"what": "llama.cpp f16", "reason": "llama-quantize failed"}], {}, {"max_context": 1024})
    b = doc["bytes_bound"]["256"]["int4"]
    assert b["bound"] == pytest.approx(1.6) and b["measured"] == pytest.approx(8.0 / 5.0 * 1.0,
                                                                               rel=0.06)
    t = doc["targets"]["256"]
    assert t["lowest_ttft"] == "pipo-int4"
    assert t["pipo_int4_over_llamacpp-Q4_K_M_per_token"] == pytest.approx(0.5)
    assert doc["results"]["256"]["ortgenai-int4"]["flagged"]
    text = report.markdown(doc)
    assert "| 256 | pipo-export PIPO | int4 | 52.5 (50.0-55.0) |" in text
    assert "FLAGGED" in text and "1.60x" in text and "llama-quantize failed" in text
    assert json.loads(json.dumps(doc))["results"]["256"]["pipo-int4"]["ttft_ms"]["min"] == 50
    assert doc["gated"] == {} and "gated operating point" not in text


def test_report_gated_operating_point_is_step_over_one_plus_commit():
    """ms/token at commit rate c = (2 x ms/token at tau < 0) / (1 + c): a step emits 1 + c."""
    from benchmarks.peers import report
    from benchmarks.peers.suite import Method, PeerBenchOptions
    opts = PeerBenchOptions(contexts=[256], repeats=1, gated_commit_rate=0.6)
    methods = [Method("pipo-int4", "pipo-export PIPO", "int4", "x", 1, None),
               Method("regular-int4", "pipo-export regular", "int4", "x", 1, None)]
    results = {"256": {"pipo-int4": [Sample(50, 10.0)], "regular-int4": [Sample(90, 18.0)]}}
    doc = report.build(opts, {"num_hidden_layers": 4}, methods, results, {}, [], {}, {})
    g = doc["gated"]["256"]
    assert set(g) == {"pipo-int4"}
    assert g["pipo-int4"]["ms_per_token"] == pytest.approx(20.0 / 1.6)
    assert "| 256 | pipo-int4 | 60.0% | 20.00 | 12.50 | 10.00 |" in report.markdown(doc)


def test_decode_bytes_counts_quantized_weights():
    from pipo_export.bench.measure import decode_bytes
    from pipo_graphs.manifest import Manifest
    from pipo_export.model.synthetic import TINY_TEXT_CONFIG, random_model
    model = random_model(TINY_TEXT_CONFIG)
    names = [f"model.layers.{n}" for n, p in model.model.layers.named_parameters() if p.ndim == 2]
    plain = {"format": "pipo-export", "contract_version": "1.0",
             "model": {"vocab_size": 32, "hidden_size": 8, "layer_types": [],
                       "num_key_value_heads": 2, "head_dim": 4, "pad_token_id": 0,
                       "eos_token_ids": [], "compressor_type": "mlp", "max_context": 64},
             "export": {"dtype": "float32", "mode": "regular", "target": "onnxruntime",
                        "opset": 18, "sample_cap": 32, "tool_versions": {}},
             "graphs": {g: {"file": f"{g}.onnx", "inputs": [], "outputs": []}
                        for g in ("prefill_compress", "decode_unfold")},
             "states": [], "files": {}}
    int4 = dict(plain, weights={"file": "weights.data", "tensors": 0, "bytes": 0,
                                "format": "int4", "bits": 4, "block_size": 32,
                                "quantized": names + ["model.embed_tokens.weight"]})
    a = decode_bytes(model, Manifest.from_json(plain), 0)
    b = decode_bytes(model, Manifest.from_json(int4), 0)
    width = 0.5 + 4 / 32 + 0.5 / 32
    assert b["lm_head"] == pytest.approx(a["lm_head"] / 4 * width)
    matmul = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim == 2)
    assert a["backbone_layers"] - b["backbone_layers"] == pytest.approx(matmul * (4 - width))


def test_options_checked_before_any_work(tmp_path):
    from benchmarks.peers.ours import needed_context
    from benchmarks.peers.suite import PeerBenchOptions, check
    from pipo_graphs.errors import PipoUserError
    assert needed_context([1024, 4096], 32) == 5120 and needed_context([255], 16) == 1024
    for bad, match in ((dict(shape="tiny"), "released-layout"),
                       (dict(precisions=["fp16"]), "--precisions"),
                       (dict(peers=["vllm"]), "--peers")):
        with pytest.raises(PipoUserError, match=match):
            check(PeerBenchOptions(workdir=str(tmp_path), **bad))


def test_cli_peers_flags(monkeypatch):
    from benchmarks.peers import __main__ as cli
    seen = []
    monkeypatch.setattr(cli, "run_peer_bench", lambda opts: seen.append(opts) or 0)
    assert cli.main(["--peers", "--layers", "4", "--contexts", "256",
                     "--precisions", "fp32,int4", "--no-peer-install"]) == 0
    opts = seen[0]
    assert opts.peers == ["ortgenai", "llamacpp"] and opts.threads == 2 and not opts.install
    assert opts.shape == "qwen3.5-0.8b" and opts.precisions == ["fp32", "int4"]
    assert cli.build_parser().parse_args(["--peers", "llamacpp"]).peers == ["llamacpp"]
    assert cli.build_parser().parse_args([]).peers == ["ortgenai", "llamacpp"]


def test_bench_command_has_no_peers():
    """`pipo-export bench` (shipped) no longer takes the peers' flags."""
    from pipo_export.cli.parser import parse_args
    assert parse_args(["bench"]).shape == "tiny"
    with pytest.raises(SystemExit):
        parse_args(["bench", "--peers"])


def test_peers_error_is_one_line(tmp_path, capsys):
    from benchmarks.peers.__main__ import main
    assert main(["--shape", "tiny", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "released-layout" in err[0]
