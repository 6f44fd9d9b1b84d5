"""`pipo-export bench`: PIPO against regular decoding and transformers eager (random weights);
with --peers, PIPO and regular decoding per precision against ONNX Runtime GenAI and llama.cpp."""
from __future__ import annotations

import argparse

from pipo_export.bench.options import BENCH_SHAPES, BenchOptions
from pipo_export.cli.flags import ids, names

DEFAULTS = BenchOptions()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipo_export.bench.peers.suite import PEERS, PeerBenchOptions  # stdlib only
    peer_defaults = PeerBenchOptions()
    p.add_argument("--shape", choices=BENCH_SHAPES, default=None,
                   help=f"default: {DEFAULTS.shape}, or {peer_defaults.shape} with --peers")
    p.add_argument("--layers", type=int, default=DEFAULTS.layers,
                   help="cut the model to its first N layers")
    p.add_argument("--contexts", type=ids, default=DEFAULTS.contexts,
                   help="prompt lengths in tokens, comma-separated (default "
                        f"{','.join(map(str, DEFAULTS.contexts))})")
    p.add_argument("--new-tokens", type=int, default=DEFAULTS.new_tokens,
                   help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=DEFAULTS.repeats,
                   help="measured rounds (after one warm-up round; with --peers every "
                        "measurement has its own warm-up run)")
    p.add_argument("--threshold", type=float, default=DEFAULTS.threshold,
                   help="tau of the gated PIPO run")
    p.add_argument("--threads", type=int, default=None,
                   help=f"intra-op threads of every tool (default: {peer_defaults.threads} "
                        "with --peers, else ONNX Runtime's default)")
    p.add_argument("--workdir", default=DEFAULTS.workdir,
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


def command(ns: argparse.Namespace) -> int:
    if ns.peers is not None:
        from pipo_export.bench.peers.suite import PeerBenchOptions, run_peer_bench
        defaults = PeerBenchOptions()
        return run_peer_bench(PeerBenchOptions(
            shape=ns.shape or defaults.shape, layers=ns.layers, contexts=ns.contexts,
            new_tokens=ns.new_tokens, repeats=ns.repeats,
            threads=defaults.threads if ns.threads is None else ns.threads,
            precisions=ns.precisions, block_size=ns.block_size, peers=ns.peers,
            genai_precisions=ns.genai_precisions, gguf_types=ns.gguf_types,
            peer_root=ns.peer_root, install=not ns.no_peer_install, wait_idle=ns.wait_idle,
            retries=ns.retries, workdir=ns.workdir, json_file=ns.json_file,
            plot_file=ns.plot_file, rebuild=ns.rebuild))
    from pipo_export.bench.run import run_bench
    return run_bench(BenchOptions(shape=ns.shape or DEFAULTS.shape, layers=ns.layers,
                                  contexts=ns.contexts, new_tokens=ns.new_tokens,
                                  repeats=ns.repeats, threshold=ns.threshold,
                                  threads=ns.threads or DEFAULTS.threads, workdir=ns.workdir,
                                  rebuild=ns.rebuild, json_file=ns.json_file,
                                  plot_file=ns.plot_file))
