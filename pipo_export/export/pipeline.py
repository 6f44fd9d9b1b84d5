"""`pipo-export export CKPT -o OUT`: trace pieces, stream weights, assemble, validate, manifest.

Stages (each printed with its time and, for long ones, an ETA):
1. open the checkpoint (or adapter + base): config, names and shapes, no weight read;
2. trace the pieces (embed, one layer per layer type, head; for both graphs);
3. stream every weight once into weights.data (the only stage that grows with model size);
4. assemble both graphs from the pieces and write them;
5. validate (pipo_export.export.validate);
6. write manifest.json.
The folder is built in a temporary sibling and renamed at the end (pipo_export.fsutil).
"""
from __future__ import annotations

import datetime
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from pipo_graphs.contract import CONFIDENCE, CONTRACT_VERSION, DECODE, HEAD_EXTRAS, HEAD_SCOPE, \
    PAIR, PAST, PREFILL, PRESENT, TARGET_CAPS, Mode, Target, state_name
from pipo_graphs.dtypes import DType
from pipo_graphs.manifest import MANIFEST, ExportInfo, FileEntry, GraphInfo, Manifest, ModelInfo, \
    StateInfo, TensorInfo, WeightsInfo, file_entries
from pipo_graphs.seal import write_sealed
from pipo_runtime.folder import TOKENIZER
from pipo_runtime.text import TOKENIZER_FILES, load_tokenizer

from pipo_export.errors import ExportError
from pipo_export.export.assemble import GraphAssembler, WeightRef, weight_names
from pipo_export.export.accuracy import TWIN_BUDGET, compare_twins
from pipo_export.export.cache import PieceCache, piece_key
from pipo_export.export.io_spec import TensorSpec, graph_specs, model_dims
from pipo_export.export.lowering import Lowering, lowering_for
from pipo_export.export.options import MIN_CONTEXT, OPSETS, ExportOptions
from pipo_export.export.pieces import LM_HEAD_PARAMS, PieceSet
from pipo_export.export.trace import trace_piece
from pipo_export.export.quantize import (QuantPlan, QuantSpec, WeightFormat, lm_head_as_matmul,
    quantize_piece)
from pipo_export.export.weights import Eta, WeightReader, write_weights
from pipo_export.fsutil import atomic_dir
from pipo_export.model.checkpoint import checkpoint_files, checkpoint_stack, open_checkpoint, \
    skeleton, torch_dtype
from pipo_export.model.regular import step_class
from pipo_export.model.steps import LAYER_KINDS
from pipo_export.onnx.graph import split_wide_gemms, symbolic_dims
from pipo_export.versions import package_versions

WEIGHTS_FILE = "weights.data"
GRAPH_FILES = {PREFILL: "prefill_compress.onnx", DECODE: "decode_unfold.onnx"}
STAGES = 6
CHECK = "check/"  # prefix of the piece-boundary outputs of validation graphs


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def progress(i: int, text: str) -> float:
    log(f"[{i}/{STAGES}] {text}")
    return time.perf_counter()


def tool_versions() -> dict:
    return package_versions(("pipo-export", "torch", "transformers", "onnx", "onnxscript",
                             "onnxruntime", "peft"))


def check_options(opts: ExportOptions) -> None:
    """Refuse, before any work, what no target here can run, and numbers out of range."""
    def whole(name, value, low, high=None, fix=""):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (
            high is None or value <= high)
        if not ok:
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ExportError(f"--{name.replace('_', '-')} must be an integer {span}, got "
                              f"{value!r}{fix}")
    if opts.max_context is not None:
        whole("max_context", opts.max_context, MIN_CONTEXT,
              fix=" (tokens of prompt plus generation; leave it out for the checkpoint's "
                  "max_position_embeddings)")
    whole("opset", opts.opset, OPSETS.start, OPSETS.stop - 1)
    whole("sample_cap", opts.sample_cap, 1, fix=" (candidates the sampler keeps)")
    if opts.trace_cache and Path(opts.trace_cache).exists() and \
            not Path(opts.trace_cache).is_dir():
        raise ExportError(f"--trace-cache {opts.trace_cache} is a file; give a folder (it is "
                          "created when missing)")
    if opts.dtype == DType.BFLOAT16:
        raise ExportError("--dtype bfloat16 is not supported: ONNX Runtime's CPU kernels have no "
                          "bfloat16 (Conv, MatMul), so the export could not be validated; use "
                          "--dtype float16 (GPU targets, half the weight bytes) or float32")
    weights = WeightFormat(opts.weights)
    if weights != WeightFormat.FLOAT:
        if not TARGET_CAPS[Target(opts.target)].quantized_weights or opts.dtype != DType.FLOAT32:
            able = [t.value for t, caps in TARGET_CAPS.items() if caps.quantized_weights]
            raise ExportError(f"--weights {weights.value} needs --target {'|'.join(able)} "
                              "--dtype float32 (MatMulNBits is an ONNX Runtime kernel; "
                              "activations stay float32)")
        if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
            raise ExportError(f"--block-size must be a power of two >= 16, got {opts.block_size}")
        if opts.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"--accuracy-level must be 0-4, got {opts.accuracy_level}")
    if opts.head_weights is not None:
        head = WeightFormat(opts.head_weights)
        if weights == WeightFormat.FLOAT or head == WeightFormat.FLOAT:
            raise ExportError(f"--head-weights {head.value} needs --weights int8|int4 (it sets "
                              "the lm_head's bits of a quantized export); drop it, or add "
                              "--weights int4")


class Traced:
    """The traced pieces of one export: embed/head per graph, one piece per layer type
    (read from the piece cache when one is given and holds them)."""

    def __init__(self, pieces: PieceSet, lowering: Lowering, opts: ExportOptions,
                 dtype: torch.dtype, text_config: dict):
        self.pieces, self.caps = pieces, TARGET_CAPS[Target(opts.target)]
        todo = {PREFILL: pieces.prefill_pieces(), DECODE: pieces.decode_pieces()}
        self.layers = {t: pieces.layer_pieces(layer) for t, layer in pieces.layer_types().items()}
        flat = [*todo[PREFILL], *todo[DECODE], *[p for pair in self.layers.values() for p in pair]]
        cache = PieceCache(opts.trace_cache, log) if opts.trace_cache else None
        settings = {"mode": opts.mode.value, "dtype": opts.dtype.value, "opset": opts.opset,
                    "lowering": lowering.key, "sample_cap": opts.sample_cap}
        start, self.protos = time.perf_counter(), {}
        for i, piece in enumerate(flat):
            t = time.perf_counter()
            key = piece_key(piece, text_config, **settings) if cache else None
            proto = cache.load(key) if cache else None
            how = "cached" if proto is not None else "traced"
            if proto is None:
                proto = trace_piece(piece, opts.opset, lowering, dtype)
                if cache:
                    cache.store(key, proto)
            self.protos[piece.name] = proto
            elapsed = time.perf_counter() - start
            log(f"  {how} {piece.name} in {time.perf_counter() - t:.1f}s ({i + 1}/{len(flat)}, "
                f"~{elapsed / (i + 1) * (len(flat) - i - 1):.0f}s left)")
        self.embed = {g: todo[g][0] for g in todo}
        self.head = {g: todo[g][1] for g in todo}

    def quantize(self, opts: ExportOptions) -> QuantPlan | None:
        """For int8/int4 exports, rewrite every piece's weight MatMuls into MatMulNBits (the
        lm_head too, at opts.head_weights when set); -> the QuantPlan the weights are written
        with."""
        fmt = WeightFormat(opts.weights)
        if fmt == WeightFormat.FLOAT:
            return None
        spec = QuantSpec(fmt.bits, opts.block_size, opts.accuracy_level, opts.symmetric)
        head = None if opts.head_weights is None else QuantSpec(
            WeightFormat(opts.head_weights).bits, opts.block_size, opts.accuracy_level,
            opts.symmetric)
        self.float_protos = dict(self.protos)
        heads = {piece.name: piece for piece in self.head.values()}
        head_params = set()  # the lm_head as its piece names it and by its checkpoint name
        for name, proto in self.protos.items():
            proto = self.protos[name] = onnx.ModelProto.FromString(proto.SerializeToString())
            if name in heads:
                params = lm_head_as_matmul(proto) & set(LM_HEAD_PARAMS)
                head_params |= params | {heads[name].global_name(p) for p in params}
        plan = QuantPlan(spec, head, frozenset(head_params))
        for proto in self.protos.values():
            quantize_piece(proto, plan)
        return plan

    def layer(self, graph: str, layer_type: str):
        return self.layers[layer_type][0 if graph == PREFILL else 1]

    def weight_names(self, layer_types: list[str], protos: dict | None = None) -> list[str]:
        """Every stored weight the two graphs read (checkpoint name + the suffix of its form),
        in graph order."""
        protos, names = protos or self.protos, []
        for graph in (PREFILL, DECODE):
            names += weight_names(self.embed[graph], protos[self.embed[graph].name])
            for i, kind in enumerate(layer_types):
                piece = self.layer(graph, kind)
                names += weight_names(piece, protos[piece.name], i)
            names += weight_names(self.head[graph], protos[self.head[graph].name])
        return list(dict.fromkeys(names))


def assemble(traced: Traced, graph: str, spec, layer_types: list[str],
             weights: dict[str, WeightRef], extra_outputs: bool = False,
             protos: dict | None = None, data_file: str = WEIGHTS_FILE):
    """One graph from the traced pieces. extra_outputs: also output every piece boundary
    (embed values, each layer's hidden state) for validation."""
    protos = protos or traced.protos
    asm = GraphAssembler(spec, weights, data_file)
    embed, head = traced.embed[graph], traced.head[graph]
    asm.add(embed, protos[embed.name], "embed")
    extra = [TensorSpec(f"{CHECK}embed/{s.name}", s.dtype, s.shape) for s in embed.outputs] \
        if extra_outputs else []
    for s in extra:
        asm.alias(s.name.rpartition("/")[2], s.name)
    for i, kind in enumerate(layer_types):
        piece = traced.layer(graph, kind)
        states = {s.name: PRESENT + state_name(s.name, i) for s in piece.outputs[1:]}
        bind = {s.name: f"{s.name}.{i}" for s in piece.inputs
                if s.name.startswith(PAST) and s.name[len(PAST):] in LAYER_KINDS}
        asm.add(piece, protos[piece.name], f"layers.{i}", i, bind, states)
        if extra_outputs:
            extra.append(TensorSpec(f"{CHECK}layers.{i}/x", piece.outputs[0].dtype,
                                    piece.outputs[0].shape))
            asm.alias("x", extra[-1].name)
    contract = set(spec.output_names)
    outputs = {s.name: s.name if s.name in (PAIR, CONFIDENCE) else PRESENT + s.name
               for s in head.outputs}
    outputs = {k: v for k, v in outputs.items() if v in contract}
    asm.add(head, protos[head.name], HEAD_SCOPE, None, {}, outputs)
    if extra_outputs:
        for s in head.outputs:
            if s.name in HEAD_EXTRAS:
                extra.append(TensorSpec(f"{CHECK}{HEAD_SCOPE}/{s.name}", s.dtype, s.shape))
                asm.alias(s.name, extra[-1].name)
    model = asm.model(tuple(extra))
    if traced.caps.half_cast_per_use:  # ORT CPU casts float16 weights per use: keep casts small
        split_wide_gemms(model)
    return model


def export(opts: ExportOptions) -> Manifest:
    check_options(opts)
    t0 = time.perf_counter()
    named = " + ".join([opts.checkpoint] * bool(opts.checkpoint) + list(opts.adapters))
    cfg, source, layout = open_checkpoint(opts.checkpoint or None, opts.base,
                                          opts.adapters)  # headers only
    max_context = opts.max_context or cfg.text.max_position_embeddings  # checked: never 0
    if max_context < MIN_CONTEXT:
        raise ExportError(f"max_position_embeddings is {max_context}, below the smallest usable "
                          f"context ({MIN_CONTEXT} tokens); pass --max-context")
    if (layout.folder / TOKENIZER).is_file():  # refused now, not sealed into the export
        load_tokenizer(layout.folder / TOKENIZER)
    progress(1, f"opened checkpoint {named}" + (f" over base {opts.base}" if opts.base else ""))
    dtype, lowering = torch_dtype(opts.dtype), lowering_for(opts.target)
    model = skeleton(cfg)
    dims = model_dims(model)
    layer_types = list(cfg.text.layer_types)
    prefill_spec, decode_spec, states = graph_specs(dims, opts.dtype.value,
                                                    mtp=opts.mode == Mode.PIPO)
    step = step_class(opts.mode)(model, kernels=lowering.kernels, sample_cap=opts.sample_cap,
                                 use_cond=True)
    timings = {}
    with atomic_dir(opts.out, opts.force) as tmp:
        t = progress(2, f"tracing pieces (mode {opts.mode.value}, target {opts.target.value}, "
                        f"lowering {lowering.name}, {opts.dtype.value}, opset {opts.opset})")
        traced = Traced(PieceSet(step, dtype), lowering, opts, dtype, cfg.text.to_dict())
        timings["trace_s"] = time.perf_counter() - t
        quant = traced.quantize(opts)
        names = traced.weight_names(layer_types)
        form = opts.dtype.value if quant is None else f"{opts.weights} (block {opts.block_size}" + (
            f", lm_head {opts.head_weights})" if opts.head_weights else ")")
        t = progress(3, f"writing {len(names)} weights as {form} to {WEIGHTS_FILE}")
        eta = Eta("weights", log)
        reader = WeightReader(source, dtype, quant)
        weights = write_weights(reader, names, tmp / WEIGHTS_FILE,
                                lambda done, total: eta(done, total, "B"))
        timings["weights_s"] = time.perf_counter() - t
        t = progress(4, "assembling both graphs from the pieces")
        paths = {g: tmp / GRAPH_FILES[g] for g in (PREFILL, DECODE)}
        for graph, spec in ((PREFILL, prefill_spec), (DECODE, decode_spec)):
            onnx.save(assemble(traced, graph, spec, layer_types, weights), str(paths[graph]))
        io = {PREFILL: _as_written(paths[PREFILL], prefill_spec),
              DECODE: _as_written(paths[DECODE], decode_spec)}
        timings["assemble_s"] = time.perf_counter() - t
        validation, stored_accuracy = None, None
        if opts.validate:
            from pipo_export.export.validate import validate_export
            t = progress(5, "validating every piece against torch float64 (teacher forced, "
                            "tolerance from torch's own noise in the export dtype)")
            validation = validate_export(
                traced, cfg, reader, layer_types, weights, tmp, opts,
                lambda graph, spec: assemble(traced, graph, spec, layer_types, weights, True),
                (prefill_spec, decode_spec), log)
            timings["validate_s"] = time.perf_counter() - t
            if quant is not None and opts.mode != Mode.PIPO:
                # eval's code scores PIPO graphs (token 1, token 2 and the gate); a regular
                # export has token 1 only
                stored_accuracy = {"measured": False, "why": "eval scores PIPO exports; measure "
                                   "the PIPO export of the same weights"}
            elif quant is not None:
                t = time.perf_counter()
                log("  measuring the quantization's accuracy against a float32 twin")
                stored_accuracy = quantization_accuracy(traced, cfg, source, layer_types,
                                                        (prefill_spec, decode_spec), weights, tmp)
                timings["accuracy_s"] = time.perf_counter() - t
        else:
            progress(5, "validation skipped (--no-validate)")
        progress(6, "writing manifest")
        tokenizer_dir = layout.folder
        copied = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
        for name in copied:
            shutil.copy2(tokenizer_dir / name, tmp / name)
        timings["total_s"] = time.perf_counter() - t0
        stored = WeightsInfo(file=WEIGHTS_FILE, tensors=len(weights),
                             bytes=(tmp / WEIGHTS_FILE).stat().st_size, format=opts.weights)
        if quant is not None:
            spec = quant.spec
            stored = replace(stored, bits=spec.bits, block_size=spec.block_size,
                             accuracy_level=spec.accuracy_level, symmetric=spec.symmetric,
                             quantized=sorted(reader.quantized), accuracy=stored_accuracy,
                             bits_by_weight=quant.bits_by_weight(reader.quantized))
            stored.extra = {"float": sorted({reader.base(n) for n in names} - reader.quantized)}
        manifest = build_manifest(cfg, dims, source, {reader.base(n) for n in names}, opts,
                                  max_context, io, states, stored, timings, validation,
                                  (prefill_spec, decode_spec))
        manifest.files = {name: FileEntry(**entry) for name, entry in file_entries(
            tmp, [*GRAPH_FILES.values(), WEIGHTS_FILE, *copied]).items()}
        write_sealed(tmp / MANIFEST, manifest.dumps())
    log(f"wrote {opts.out}: {stored.tensors} weight tensors, {stored.bytes:,} bytes in "
        f"{WEIGHTS_FILE}; {timings['total_s']:.1f}s")
    return manifest


def quantization_accuracy(traced: Traced, cfg, source, layer_types, specs, weights,
                          tmp: Path) -> dict:
    """A quantized export against its float32 twin (pipo_export.export.accuracy)."""
    twin_names = traced.weight_names(layer_types, traced.float_protos)
    reader = WeightReader(source, torch.float32)
    twin_bytes = sum(math.prod(source.shape(reader.base(n))) * 4 for n in twin_names)
    if twin_bytes > TWIN_BUDGET:
        return {"measured": False, "why": f"the float32 twin needs {twin_bytes / 2**30:.1f} GiB "
                                          f"(budget {TWIN_BUDGET / 2**30:.0f} GiB)"}
    twin_file = ".accuracy-twin.data"
    paths = {}
    try:
        refs = write_weights(reader, twin_names, tmp / twin_file)
        for kind, protos, data, w in (("twin", traced.float_protos, twin_file, refs),
                                      ("quant", traced.protos, WEIGHTS_FILE, weights)):
            for graph, spec in zip((PREFILL, DECODE), specs):
                paths[kind, graph] = tmp / f".accuracy-{kind}-{graph}.onnx"
                onnx.save(assemble(traced, graph, spec, layer_types, w, False, protos, data),
                          str(paths[kind, graph]))
        report = compare_twins({g: paths["twin", g] for g in (PREFILL, DECODE)},
                               {g: paths["quant", g] for g in (PREFILL, DECODE)},
                               cfg.vocab_size, cfg.pad_token_id)
        return {"measured": True, **report}
    finally:
        for path in list(paths.values()) + [tmp / twin_file]:
            path.unlink(missing_ok=True)


def _as_written(path: Path, spec) -> list[dict]:
    """The graph's I/O as written (symbolic dims), checked against the spec."""
    dims = symbolic_dims(path)
    out = []
    for t in spec.inputs + spec.outputs:
        got = dims.get(t.name)
        if got != list(t.shape):
            raise ExportError(f"{path.name}: {t.name} is {got}, the contract says {list(t.shape)}")
        out.append({"name": t.name, "dtype": t.dtype, "shape": got})
    return out


def build_manifest(cfg, dims, source, names, opts, max_context, io, states,
                   stored: WeightsInfo, timings, validation, specs) -> Manifest:
    """The typed manifest (pipo_graphs.manifest): a misspelt field fails here, a value of the
    wrong type in Manifest.dumps; `files` is filled once every file is written."""
    folder, stack = checkpoint_stack(opts.checkpoint or None, opts.base, opts.adapters)

    def tensors(graph: str, wanted) -> list[TensorInfo]:
        return [TensorInfo(**t) for t in io[graph] if t["name"] in set(wanted)]

    return Manifest(
        format="pipo-export",
        contract_version=CONTRACT_VERSION,
        model=ModelInfo(
            vocab_size=dims.vocab_size, hidden_size=dims.hidden_size,
            layer_types=list(dims.layer_types), num_key_value_heads=dims.num_key_value_heads,
            head_dim=dims.head_dim, conv_dim=dims.conv_dim, conv_kernel=dims.conv_kernel,
            linear_num_value_heads=dims.linear_num_value_heads,
            linear_key_head_dim=dims.linear_key_head_dim,
            linear_value_head_dim=dims.linear_value_head_dim,
            pad_token_id=cfg.pad_token_id, eos_token_ids=list(cfg.eos_token_ids),
            compressor_type=cfg.compressor_type.value, max_context=max_context,
            parameters=sum(math.prod(source.shape(n)) for n in names)),
        export=ExportInfo(
            mode=opts.mode, target=opts.target, dtype=opts.dtype, opset=opts.opset,
            sample_cap=min(opts.sample_cap, dims.vocab_size), tool_versions=tool_versions(),
            source=str((stack[0] if stack else folder).resolve()),
            base=str(Path(opts.base).resolve()) if opts.base else None,
            adapters=[str(a.resolve()) for a in stack],
            source_files={name: FileEntry(**entry) for name, entry in checkpoint_files(
                stack[0] if stack else folder, opts.base, stack[1:]).items()},
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            timings=timings, validation=validation),
        graphs={g: GraphInfo(file=GRAPH_FILES[g], inputs=tensors(g, spec.input_names),
                             outputs=tensors(g, spec.output_names))
                for g, spec in ((PREFILL, specs[0]), (DECODE, specs[1]))},
        weights=stored,
        states=[StateInfo(name=s.name, dtype=s.dtype, shape=list(s.shape), layer=s.layer,
                          kind=s.kind) for s in states],
        files={})
