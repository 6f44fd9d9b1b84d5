"""`pipo-export export CKPT -o OUT`: trace both graphs, share weights, validate, write manifest."""
from __future__ import annotations

import datetime
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipo_graphs import step_uniforms
from pipo_graphs.contract import CONTRACT_VERSION, DECODE, PREFILL
from pipo_graphs.manifest import MANIFEST, file_entries
from pipo_runtime.runners import OrtRunner
from pipo_runtime.text import TOKENIZER_FILES

from pipo_export.model.checkpoint import load_checkpoint, torch_dtype
from pipo_export.errors import ExportError
from pipo_export.model.steps import MtpContext
from pipo_export.fsutil import atomic_dir
from pipo_export.export.io_spec import graph_specs, model_dims
from pipo_export.export.lowering.standard import STANDARD_KERNELS
from pipo_export.export.options import ExportOptions
from pipo_graphs.contract import Mode
from pipo_export.model.regular import step_class
from pipo_export.export.trace import trace_decode, trace_prefill
from pipo_export.onnx.graph import symbolic_dims
from pipo_export.export.validate import TOLERANCES, reference_step, validate_steps
from pipo_export.versions import package_versions
from pipo_export.export.weights import share_weights

WEIGHTS_FILE = "weights.data"
GRAPH_FILES = {PREFILL: "prefill_compress.onnx", DECODE: "decode_unfold.onnx"}
STAGES = 6


def progress(i: int, text: str) -> float:
    print(f"[{i}/{STAGES}] {text}", file=sys.stderr, flush=True)
    return time.perf_counter()


def tool_versions() -> dict:
    return package_versions(("pipo-export", "torch", "transformers", "onnx", "onnxscript",
                             "onnxruntime"))


def kernels_for(target):
    """Both targets use the standard-op lowering (Scan chunked delta rule, plain decode step)."""
    return STANDARD_KERNELS


def check_symbolic(path: Path, spec) -> list[dict]:
    """Assert every dim the spec marks dynamic is symbolic in the file; -> tensors as written."""
    dims = symbolic_dims(path)
    tensors = []
    for t in spec.inputs + spec.outputs:
        got = dims.get(t.name)
        if got is None or len(got) != len(t.shape):
            raise ExportError(f"{path.name}: {t.name} is missing or has rank {got and len(got)}, "
                              f"expected {len(t.shape)}")
        for want, have in zip(t.shape, got):
            if isinstance(want, str) and not isinstance(have, str):
                raise ExportError(f"{path.name}: {t.name} dim '{want}' was specialized to {have}; "
                                  "the trace example must not fix dynamic dims")
            if isinstance(want, int) and have != want:
                raise ExportError(f"{path.name}: {t.name} has dim {have}, expected {want}")
        tensors.append({"name": t.name, "dtype": t.dtype, "shape": got})
    return tensors


def validation_feeds(model, dims_batch=3):
    """Mixed-length batch covering one odd, one short and one multi-chunk prompt."""
    rng = np.random.default_rng(0)
    v, pad = model.config.vocab_size, model.config.pad_token_id
    lengths = np.array([11, 2, 261], dtype=np.int64)[:dims_batch]
    ids = np.full((len(lengths), int(lengths.max()) + int(lengths.max()) % 2), pad, np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(0, v - 1, n)
    sampling = {"temperature": np.array([0.0, 0.9, 1.2], np.float32), "top_k": np.array([0, 20, 0]),
                "top_p": np.array([1.0, 0.95, 0.8], np.float32),
                "min_p": np.array([0.0, 0.0, 0.05], np.float32),
                "presence_penalty": np.array([0.0, 1.5, 0.5], np.float32),
                "repetition_penalty": np.array([1.0, 1.0, 1.2], np.float32),
                "threshold": np.array([-1.0, 0.5, 0.2], np.float32)}
    sampling = {k: a[:len(lengths)] for k, a in sampling.items()}
    seqs = list(range(len(lengths)))
    return ({"input_ids": ids, "lengths": lengths, **sampling, "uniforms": step_uniforms(5, seqs, 0)},
            sampling, lambda step: step_uniforms(5, seqs, step))


def export(opts: ExportOptions) -> dict:
    t0 = progress(1, f"loading checkpoint {opts.checkpoint} ({opts.dtype.value})")
    model = load_checkpoint(opts.checkpoint, dtype=torch_dtype(opts.dtype))
    dims = model_dims(model)
    pipo = opts.mode == Mode.PIPO
    prefill_spec, decode_spec, states = graph_specs(dims, opts.dtype.value, mtp=pipo)
    step = step_class(opts.mode)(model, kernels=kernels_for(opts.target),
                                 sample_cap=opts.sample_cap, use_cond=True,
                                 mtp_context=MtpContext(opts.mtp_context))
    max_context = opts.max_context or model.config.text.max_position_embeddings
    timings = {}
    with atomic_dir(opts.out, opts.force) as tmp:
        t = progress(2, f"tracing {DECODE} (mode {opts.mode.value}, target {opts.target.value}, "
                        f"opset {opts.opset})")
        trace_decode(step, decode_spec, states, tmp / GRAPH_FILES[DECODE], opts.opset)
        timings["trace_decode_s"] = time.perf_counter() - t
        t = progress(3, f"tracing {PREFILL}")
        trace_prefill(step, prefill_spec, states, tmp / GRAPH_FILES[PREFILL], opts.opset)
        timings["trace_prefill_s"] = time.perf_counter() - t
        progress(4, "storing weights once, shared by both graphs")
        paths = [tmp / GRAPH_FILES[PREFILL], tmp / GRAPH_FILES[DECODE]]
        weights = share_weights(paths, WEIGHTS_FILE)
        io = {PREFILL: check_symbolic(paths[0], prefill_spec),
              DECODE: check_symbolic(paths[1], decode_spec)}
        validation = None
        if opts.validate:
            atol, rtol = TOLERANCES[opts.dtype.value]
            t = progress(5, f"validating with ONNX Runtime against torch float64 (atol {atol} x "
                            f"output scale, rtol {rtol})")
            validation = _validate(model, paths, atol, rtol, opts)
            timings["validate_s"] = time.perf_counter() - t
        else:
            progress(5, "validation skipped (--no-validate)")
        progress(6, "writing manifest")
        copied = [n for n in TOKENIZER_FILES if (Path(opts.checkpoint) / n).is_file()]
        for name in copied:
            shutil.copy2(Path(opts.checkpoint) / name, tmp / name)
        timings["total_s"] = time.perf_counter() - t0
        manifest = build_manifest(model, dims, opts, max_context, io, states, weights, timings,
                                  validation, (prefill_spec, decode_spec))
        manifest["files"] = file_entries(tmp, [*GRAPH_FILES.values(), WEIGHTS_FILE, *copied])
        import json
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"wrote {opts.out}: {weights['tensors']} weight tensors, {weights['bytes']:,} bytes in "
          f"{WEIGHTS_FILE}; {timings['total_s']:.1f}s", file=sys.stderr)
    return manifest


def _validate(model, paths, atol, rtol, opts) -> dict:
    ref_step = reference_step(model, step_class(opts.mode), sample_cap=opts.sample_cap,
                              mtp_context=MtpContext(opts.mtp_context))
    feeds, sampling, uniforms = validation_feeds(model)
    state_dtype = {"float32": np.float32, "float16": np.float16}.get(opts.dtype.value, np.float32)
    with OrtRunner(paths[0]) as pre, OrtRunner(paths[1]) as dec:
        report = validate_steps(ref_step, pre, dec, feeds, 2, sampling, uniforms, atol, rtol,
                                state_dtype)
    worst, near_ties = {}, [step for step, errors in report if errors[0].name == "near_tie"]
    if len(near_ties) == len(report):
        raise ExportError("validation could not compare any step: every step's tokens sat at a "
                          "near-tie of the float64 reference; the export was not written")
    for step, errors in report:
        for e in (e for e in errors if e.name != "near_tie"):
            if not e.ok:
                raise ExportError(f"validation failed at step {step}: {e.name} max abs error "
                                  f"{e.max_abs:.3g} (atol {atol}, rtol {rtol}, {e.mismatches} "
                                  "elements outside); the export was not written")
            worst[e.name] = max(worst.get(e.name, 0.0), e.max_abs)
    if near_ties:
        print(f"  steps {near_ties}: a token differs where the float64 reference is at a near-tie "
              "(also picks it under 1e-3 logit noise); those steps were not compared",
              file=sys.stderr)
    return {"atol": atol, "rtol": rtol, "steps": len(report), "near_tie_steps": near_ties,
            "max_abs_error": worst}


def build_manifest(model, dims, opts, max_context, io, states, weights, timings, validation,
                   specs):
    cfg = model.config
    return {
        "format": "pipo-export",
        "contract_version": CONTRACT_VERSION,
        "model": {"vocab_size": dims.vocab_size, "hidden_size": dims.hidden_size,
                  "layer_types": dims.layer_types, "num_key_value_heads": dims.num_key_value_heads,
                  "head_dim": dims.head_dim, "conv_dim": dims.conv_dim,
                  "conv_kernel": dims.conv_kernel,
                  "linear_num_value_heads": dims.linear_num_value_heads,
                  "linear_key_head_dim": dims.linear_key_head_dim,
                  "linear_value_head_dim": dims.linear_value_head_dim,
                  "pad_token_id": cfg.pad_token_id, "eos_token_ids": cfg.eos_token_ids,
                  "compressor_type": cfg.compressor_type.value, "max_context": max_context,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "export": {"mode": opts.mode.value, "target": opts.target.value, "dtype": opts.dtype.value, "opset": opts.opset,
                   "sample_cap": min(opts.sample_cap, dims.vocab_size),
                   "mtp_context": opts.mtp_context, "tool_versions": tool_versions(),
                   "source": str(Path(opts.checkpoint).resolve()),
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "timings": timings, "validation": validation},
        "graphs": {g: {"file": GRAPH_FILES[g], "inputs": [t for t in io[g] if t["name"] in
                                                           {i.name for i in spec.inputs}],
                       "outputs": [t for t in io[g] if t["name"] in {o.name for o in spec.outputs}]}
                   for g, spec in ((PREFILL, specs[0]), (DECODE, specs[1]))},
        "weights": {"file": WEIGHTS_FILE, **weights},
        "states": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "layer": s.layer,
                    "kind": s.kind} for s in states],
    }
