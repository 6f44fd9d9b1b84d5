"""The command line's layout (issue 18): each command module owns its flags, the parser only
lists the modules, no command module imports another, and `--help` imports no torch."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipo_export.cli.parser import COMMANDS, command_module

CLI = Path(__file__).resolve().parents[2] / "pipo_export" / "cli"
HEAVY = ("torch", "transformers", "peft", "onnxscript")
HARNESS = ("benchmarks", "pipo_export.bench.run", "pipo_export.bench.measure")

PROBE = ("import json, sys\n"
         "from pipo_export.cli import main\n"
         "try:\n"
         "    main(sys.argv[1:])\n"
         "except SystemExit:\n"
         "    pass\n"
         "print(json.dumps(sorted(sys.modules)))\n")


def _modules_after(*args: str) -> set[str]:
    """The modules a child process has imported after `pipo-export ARGS`."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    """torch and the other compiler packages, and the bench harness."""
    return sorted(m for m in modules if m.split(".")[0] in HEAVY
                  or any(m == h or m.startswith(h + ".") for h in HARNESS))


def test_top_level_help_imports_no_command_torch_or_bench():
    modules = _modules_after("--help")
    assert not _heavy(modules)
    assert not {m for m in modules if m.startswith("pipo_export.bench")}
    assert not {e.module for e in COMMANDS.values()} & modules  # the table alone


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_imports_no_torch(name):
    modules = _modules_after(name, "--help")
    assert COMMANDS[name].module in modules
    assert not _heavy(modules), f"`{name} --help` imported {_heavy(modules)[:3]}"
    others = {e.module for n, e in COMMANDS.items() if n != name}
    assert not others & modules


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_command_module_imports_another():
    modules = {e.module for e in COMMANDS.values()}
    for path in sorted(CLI.glob("*.py")):
        own = f"pipo_export.cli.{path.stem}"
        found = (_imported(path) & modules) - {own}
        assert not found, f"{path.name} imports {sorted(found)}"


def test_every_command_has_add_arguments_and_command():
    for name in COMMANDS:
        module = command_module(name)
        assert callable(module.add_arguments) and callable(module.command), name
