"""Per-token latency: the C++ runtime (pipo-run) against pipo_runtime (`pipo-export run`).

    .venv/bin/python runtimes/cpp/bench_latency.py build/small-ort [--repeats 5]
        [--prompt-len 64] [--steps 65] [--pipo-run build/cpp/pipo-run] [-- extra flags]

Runs both CLIs alternately on the same export, prompt (64 ids) and flags, one generation per
process (each loads the export once), and prints the medians of the timings both report with
--json: ttft_ms, ms_per_step, ms_per_token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("ttft_ms", "ms_per_step", "ms_per_token")


def timings(cmd: list[str]) -> tuple[dict, list]:
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out["timings"], out["pairs"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=65)
    p.add_argument("--pipo-run", default=str(ROOT / "build" / "cpp" / "pipo-run"))
    p.add_argument("extra", nargs="*", help="flags for both, after --")
    a = p.parse_args()
    ids = ",".join(str((i * 37 + 11) % 500) for i in range(a.prompt_len))
    common = ["--ids", ids, "--max-steps", str(a.steps), "--json", *a.extra]
    cmds = {"pipo_runtime (python)": [str(ROOT / ".venv" / "bin" / "pipo-export"), "run",
                                      a.export, *common],
            "C++ pipo-run": [a.pipo_run, a.export, *common]}
    runs = {name: [] for name in cmds}
    pairs = {}
    for _ in range(a.repeats):
        for name, cmd in cmds.items():
            t, pairs[name] = timings(cmd)
            runs[name].append(t)
    same = len({json.dumps(v) for v in pairs.values()}) == 1
    print(f"export {a.export}, prompt {a.prompt_len} ids, {a.steps} steps, {a.repeats} repeats; "
          f"identical pairs: {same}")
    print(f"{'runtime':<24}" + "".join(f"{k:>16}" for k in KEYS) + "   (medians)")
    for name, rs in runs.items():
        print(f"{name:<24}" + "".join(f"{statistics.median(r[k] for r in rs):>16.3f}"
                                      for k in KEYS))
    print("all ms_per_step:", {n: [r["ms_per_step"] for r in rs] for n, rs in runs.items()})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
