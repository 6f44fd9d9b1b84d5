"""`pipo-export check OUT`: verify an export folder without running it (no torch)."""
from __future__ import annotations

import argparse
import json

from pipo_graphs.errors import PipoUserError


def run_check(folder: str, as_json: bool = False) -> int:
    """0 when every check passes, 1 when a check fails; a folder the runtimes refuse to load
    is a PipoUserError (one line, exit 2), as in `run`."""
    from pipo_export.onnx.check import check_export

    report = check_export(folder)
    if report.refused:
        raise PipoUserError(report.refused)
    if as_json:
        print(json.dumps({"ok": report.ok, "checks": [
            {"check": n, "ok": ok, "detail": d} for n, ok, d in report.checks]}, indent=2))
    else:
        for name, ok, detail in report.checks:
            print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
        print("export OK" if report.ok else f"{folder}: check FAILED")
    return 0 if report.ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out")
    p.add_argument("--json", action="store_true")


def command(ns: argparse.Namespace) -> int:
    return run_check(ns.out, ns.json)
