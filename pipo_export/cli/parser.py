"""The `pipo-export` argument parser. Flag defaults come from the options dataclasses they fill,
so each default is written once. Importing this module needs no torch."""
from __future__ import annotations

import argparse

from pipo_graphs import SamplingParams
from pipo_graphs.contract import Mode, Target
from pipo_graphs.dtypes import DType
from pipo_runtime.backends import Backend
from pipo_runtime.session import DEFAULT_MAX_STEPS

from pipo_export.cli.compare import DEFAULT_BACKENDS, CompareArgs
from pipo_export.cli.run import RunArgs
from pipo_export.export.options import ExportOptions

DTYPES = tuple(d.value for d in DType)
EXPORT_DEFAULTS = ExportOptions(checkpoint="", out="")
RUN_DEFAULTS = RunArgs(source="")
COMPARE_DEFAULTS = CompareArgs(source="", backends=list(DEFAULT_BACKENDS))


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids takes comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--ids needs at least one token id")
    return ids


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """Prompt, steps, gate and sampling flags shared by run and compare."""
    p.add_argument("--ids", type=_ids, action="append", default=[],
                   help="prompt token ids, e.g. 5,17,300 (repeat for a batch)")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (needs tokenizer.json in the folder; repeat for a batch)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="prefill + decode steps; each emits one pair (default "
                        f"{DEFAULT_MAX_STEPS} unless --max-new-tokens is given)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="stop after this many user tokens (export folders)")
    p.add_argument("--stop-token-ids", type=_ids, default=(),
                   help="comma-separated ids that end a sequence, like EOS")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string: text is cut before it (export with a tokenizer; repeatable)")
    p.add_argument("--threshold", type=float, default=RUN_DEFAULTS.threshold,
                   help="confidence gate tau: <0 always keep token2, >=1 never "
                        f"(default {RUN_DEFAULTS.threshold:g})")
    add_sampling_flags(p, RUN_DEFAULTS.sampling)
    p.add_argument("--seed", type=int, default=RUN_DEFAULTS.seed)


def add_sampling_flags(p: argparse.ArgumentParser, defaults: SamplingParams) -> None:
    p.add_argument("--temperature", type=float, default=defaults.temperature,
                   help="0 = greedy" + (" (default)" if defaults.temperature == 0 else ""))
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--min-p", type=float, default=defaults.min_p)
    p.add_argument("--presence-penalty", type=float, default=defaults.presence_penalty)
    p.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)


def sampling_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                          min_p=ns.min_p, presence_penalty=ns.presence_penalty,
                          repetition_penalty=ns.repetition_penalty)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the house error format: one line, exit 2 (argparse prints usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pipo-export", description="Deployment compiler for PIPO (Pair-In, Pair-Out) language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a PIPO checkpoint folder holds")
    p.add_argument("checkpoint", help="PIPO checkpoint folder, or a PEFT adapter folder with --base")
    p.add_argument("--base", default=None, help="the Qwen3.5 base folder of an adapter")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its Qwen3.5 base (writes a "
                                     "PIPO checkpoint folder)")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + "
                                   "adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="the Qwen3.5 base folder the adapter was trained on")
    p.add_argument("-o", "--out", required=True, help="merged checkpoint folder to write")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: each tensor keeps the base's dtype")
    p.add_argument("--force", action="store_true", help="replace an existing folder")

    p = sub.add_parser("tiny", help="write a built-in PIPO checkpoint with random weights")
    p.add_argument("out")
    p.add_argument("--shape", choices=("tiny", "small", "qwen3.5-0.8b", "qwen3.5-4b",
                                       "qwen3.5-9b"), default="tiny",
                   help="tiny: hidden 64, 4 layers; small: hidden 256, 8 layers; qwen3.5-*: the "
                        "published text dims, released layout, bf16 shards, written tensor by "
                        "tensor")
    p.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing folder")

    p = sub.add_parser("export", help="compile a checkpoint into prefill/decode ONNX graphs")
    p.add_argument("checkpoint", help="PIPO checkpoint folder, or a PEFT adapter folder with --base")
    p.add_argument("--base", default=None, help="the Qwen3.5 base folder of an adapter")
    p.add_argument("-o", "--out", required=True, help="export folder to write")
    p.add_argument("--target", choices=[t.value for t in Target],
                   default=EXPORT_DEFAULTS.target.value)
    p.add_argument("--dtype", choices=DTYPES, default=EXPORT_DEFAULTS.dtype.value)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated) the export accepts; default: the config's "
                        "max_position_embeddings")
    p.add_argument("--opset", type=int, default=EXPORT_DEFAULTS.opset)
    p.add_argument("--sample-cap", type=int, default=EXPORT_DEFAULTS.sample_cap,
                   help=f"top candidates the in-graph sampler draws from (default "
                        f"{EXPORT_DEFAULTS.sample_cap})")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=EXPORT_DEFAULTS.mode.value,
                   help="regular: the backbone alone as a plain causal LM, one token per step "
                        "(the baseline `bench` compares PIPO against)")
    p.add_argument("--weights", choices=("float", "int8", "int4"), default=EXPORT_DEFAULTS.weights,
                   help="weight-only quantization of every MatMul weight (ONNX Runtime "
                        "MatMulNBits; needs --target onnxruntime --dtype float32)")
    p.add_argument("--block-size", type=int, default=EXPORT_DEFAULTS.block_size,
                   help=f"quantization block along K (default {EXPORT_DEFAULTS.block_size})")
    p.add_argument("--accuracy-level", type=int, default=EXPORT_DEFAULTS.accuracy_level,
                   help="MatMulNBits compute (int8/int4): 4 = int8 activations (fast, default), "
                        "0 = float32")
    p.add_argument("--asymmetric", action="store_true",
                   help="int8/int4 with a zero point per block (default: symmetric, as ONNX "
                        "Runtime GenAI's int4)")
    p.add_argument("--trace-cache", default=None, metavar="DIR",
                   help="reuse traced pieces from DIR (same architecture, dtype, target, opset); "
                        "written there when missing")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the ONNX Runtime vs torch check at the end of the export")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")

    p = sub.add_parser("check", help="verify an export folder (checker, checksums, dims, lint)")
    p.add_argument("out")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("build", help="build TensorRT engines from a --target tensorrt export "
                                     "(needs TensorRT and an NVIDIA GPU)")
    p.add_argument("out")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: the export's dtype")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens (prompt + generated); default: the export's max_context")
    p.add_argument("--profiles", default="",
                   help="context sizes in tokens where a new optimization profile starts, e.g. 512,4096")
    p.add_argument("--timing-cache", default=None, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace existing engines")
    p.add_argument("--verbose", action="store_true", help="show Polygraphy's and TensorRT's log")

    p = sub.add_parser("compare", help="run the same prompts and random numbers on several "
                                       "backends and compare them step by step")
    p.add_argument("source", help="export folder (or a checkpoint, exported to a temp folder)")
    p.add_argument("--backends", default=",".join(b.value for b in COMPARE_DEFAULTS.backends))
    p.add_argument("--steps", type=int, default=COMPARE_DEFAULTS.steps)
    p.add_argument("--threshold", type=float, default=COMPARE_DEFAULTS.threshold)
    p.add_argument("--seed", type=int, default=COMPARE_DEFAULTS.seed)
    p.add_argument("--atol", type=float, default=COMPARE_DEFAULTS.atol)
    p.add_argument("--rtol", type=float, default=COMPARE_DEFAULTS.rtol)
    p.add_argument("--ids", type=_ids, action="append", default=[],
                   help="prompt ids (repeat for a batch); default: three built-in prompts")
    add_sampling_flags(p, COMPARE_DEFAULTS.sampling)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print Polygraphy's full error statistics")

    from pipo_export.bench.peers.suite import PEERS, PeerBenchOptions  # stdlib only
    peer_defaults = PeerBenchOptions()

    def names(text: str) -> list[str]:
        return [t for t in text.replace(" ", "").split(",") if t]

    p = sub.add_parser("bench", help="benchmark PIPO against regular decoding and transformers "
                                     "eager on a built-in shape (random weights); --peers: "
                                     "against ONNX Runtime GenAI and llama.cpp")
    p.add_argument("--shape", choices=("tiny", "small", "qwen3.5-0.8b"), default=None,
                   help=f"default: tiny, or {peer_defaults.shape} with --peers")
    p.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers")
    p.add_argument("--contexts", type=_ids, default=[1024, 4096],
                   help="prompt lengths in tokens, comma-separated (default 1024,4096)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured rounds (after one warm-up round; with --peers every "
                        "measurement has its own warm-up run)")
    p.add_argument("--threshold", type=float, default=0.5, help="tau of the gated PIPO run")
    p.add_argument("--threads", type=int, default=None,
                   help=f"intra-op threads of every tool (default: {peer_defaults.threads} "
                        "with --peers, else ONNX Runtime's default)")
    p.add_argument("--workdir", default="build/bench",
                   help="where checkpoints and exports are written and reused")
    p.add_argument("--rebuild", action="store_true", help="export again even if present")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE")
    p.add_argument("--plot", dest="plot_file", default=None, metavar="FILE.png")
    g = p.add_argument_group("peers (--peers)")
    g.add_argument("--peers", type=names, nargs="?", const=list(PEERS), default=None,
                   metavar=",".join(PEERS),
                   help="also run ONNX Runtime GenAI and llama.cpp on the same weights, each "
                        "in its own venv under --peer-root (a peer that cannot be installed "
                        "or run is skipped with one line); needs --shape qwen3.5-0.8b")
    g.add_argument("--precisions", type=names, default=peer_defaults.precisions,
                   help="our exports, PIPO and regular each: fp32,int8,int4 (default); int8/int4 "
                        "use export --weights (skipped if the exporter refuses them)")
    g.add_argument("--block-size", type=int, default=peer_defaults.block_size,
                   help="int8/int4 quantization block")
    g.add_argument("--genai-precisions", type=names, default=peer_defaults.genai_precisions,
                   help="ONNX Runtime GenAI model builder -p values (default int4,fp32)")
    g.add_argument("--gguf-types", type=names, default=peer_defaults.gguf_types,
                   help="llama.cpp GGUF types (default f16,q8_0,Q4_K_M)")
    g.add_argument("--peer-root", default=peer_defaults.peer_root,
                   help="where the peers' venvs and the llama.cpp build live")
    g.add_argument("--no-peer-install", action="store_true",
                   help="use the peers' existing venvs only; skip a peer that is missing")
    g.add_argument("--wait-idle", type=float, default=peer_defaults.wait_idle, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes "
                        "to leave the cores idle")
    g.add_argument("--retries", type=int, default=peer_defaults.retries,
                   help="re-time a measurement other processes disturbed (>= 0.25 cores)")

    p = sub.add_parser("run", help="generate from a checkpoint (torch) or an export")
    p.add_argument("source", help="checkpoint folder, PEFT adapter folder (with --base) or "
                                  "export folder")
    p.add_argument("--base", default=None, help="the Qwen3.5 base folder of an adapter")
    p.add_argument("--backend", choices=[b.value for b in Backend], default=None,
                   help="default: torch for a checkpoint, onnxruntime for an export")
    p.add_argument("--dtype", choices=DTYPES, default=RUN_DEFAULTS.dtype, help="torch backend dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--providers", default=",".join(RUN_DEFAULTS.providers),
                   help="ONNX Runtime providers, comma-separated: cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=RUN_DEFAULTS.threads,
                   help="ONNX Runtime intra-op threads")
    add_generation_flags(p)

    from pipo_export.cli import eval as eval_cli
    eval_cli.add_arguments(sub.add_parser(
        "eval", help="perplexity, KL against a reference and the confidence gate of an export, "
                     "teacher forced on a text"))
    return parser


