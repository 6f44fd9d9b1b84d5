"""`python -m benchmarks.peers`: the peers bench's command line (run at the repository root).

    python -m benchmarks.peers --peers ortgenai,llamacpp --precisions int4 --layers 4 \\
        --contexts 1024,4096 --json benchmarks/results/peers.json \\
        --plot benchmarks/results/peers.png
"""
from __future__ import annotations

import argparse
import sys

from pipo_graphs.errors import PipoUserError

from pipo_export.cli.flags import OneLineParser, ids, names
from benchmarks.peers.suite import PEERS, PeerBenchOptions, run_peer_bench

DEFAULTS = PeerBenchOptions()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m benchmarks.peers",
                      description="PIPO and regular decoding per precision against ONNX Runtime "
                                  "GenAI and llama.cpp, on a released-layout shape (random "
                                  "weights)")
    p.add_argument("--peers", type=names, nargs="?", const=list(PEERS), default=list(PEERS),
                   metavar=",".join(PEERS),
                   help="the peers to run, each in its own venv under --peer-root (a peer that "
                        "cannot be installed or run is skipped with one line; default: all)")
    p.add_argument("--shape", default=DEFAULTS.shape, help=f"default: {DEFAULTS.shape}")
    p.add_argument("--layers", type=int, default=DEFAULTS.layers,
                   help="cut the model to its first N layers")
    p.add_argument("--contexts", type=ids, default=DEFAULTS.contexts,
                   help="prompt lengths in tokens, comma-separated (default "
                        f"{','.join(map(str, DEFAULTS.contexts))})")
    p.add_argument("--new-tokens", type=int, default=DEFAULTS.new_tokens,
                   help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=DEFAULTS.repeats,
                   help="measured rounds (every measurement has its own warm-up run)")
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help=f"intra-op threads of every tool (default {DEFAULTS.threads})")
    p.add_argument("--workdir", default=DEFAULTS.workdir,
                   help="where checkpoints and exports are written and reused")
    p.add_argument("--rebuild", action="store_true", help="export again even if present")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE")
    p.add_argument("--plot", dest="plot_file", default=None, metavar="FILE.png")
    p.add_argument("--precisions", type=names, default=DEFAULTS.precisions,
                   help="our exports, PIPO and regular each: fp32,int8,int4 (default); int8/int4 "
                        "use export --weights (skipped if the exporter refuses them)")
    p.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                   help="int8/int4 quantization block")
    p.add_argument("--genai-precisions", type=names, default=DEFAULTS.genai_precisions,
                   help="ONNX Runtime GenAI model builder -p values (default int4,fp32)")
    p.add_argument("--gguf-types", type=names, default=DEFAULTS.gguf_types,
                   help="llama.cpp GGUF types (default f16,q8_0,Q4_K_M)")
    p.add_argument("--peer-root", default=DEFAULTS.peer_root,
                   help="where the peers' venvs and the llama.cpp build live")
    p.add_argument("--no-peer-install", action="store_true",
                   help="use the peers' existing venvs only; skip a peer that is missing")
    p.add_argument("--wait-idle", type=float, default=DEFAULTS.wait_idle, metavar="SECONDS",
                   help="before each measurement, wait up to this long for other processes "
                        "to leave the cores idle")
    p.add_argument("--retries", type=int, default=DEFAULTS.retries,
                   help="re-time a measurement other processes disturbed (>= 0.25 cores)")
    p.add_argument("--gated-commit-rate", type=float, default=None, metavar="C",
                   help="add PIPO's gated operating point: ms/token when a trained gate keeps "
                        "token 2 in a fraction C of steps (the quality table's commit rate at "
                        "tau 0.5), from the measured step time: step / (1 + C)")
    return p


def options(ns: argparse.Namespace) -> PeerBenchOptions:
    return PeerBenchOptions(
        shape=ns.shape, layers=ns.layers, contexts=ns.contexts, new_tokens=ns.new_tokens,
        repeats=ns.repeats, threads=ns.threads, precisions=ns.precisions,
        block_size=ns.block_size, peers=ns.peers, genai_precisions=ns.genai_precisions,
        gguf_types=ns.gguf_types, peer_root=ns.peer_root, install=not ns.no_peer_install,
        wait_idle=ns.wait_idle, retries=ns.retries, workdir=ns.workdir,
        json_file=ns.json_file, plot_file=ns.plot_file, rebuild=ns.rebuild,
        gated_commit_rate=ns.gated_commit_rate)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = options(parser.parse_args(argv))
    if opts.gated_commit_rate is not None and not 0 <= opts.gated_commit_rate <= 1:
        parser.error(f"--gated-commit-rate is a fraction in [0, 1], got {opts.gated_commit_rate}")
    try:
        return run_peer_bench(opts)
    except PipoUserError as exc:
        print(f"benchmarks.peers: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
