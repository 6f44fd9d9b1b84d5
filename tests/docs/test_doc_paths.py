"""The documentation names only paths that exist, and nothing outside the repository.

Which words of a doc are repository paths (the rule, so placeholders are never flagged):
- a markdown link `[text](target)` that is not a URL or an anchor: always a path, relative to
  the doc's folder (as every markdown renderer resolves it);
- a word of an inline code span (`...`, not fenced blocks) that contains "/" or ends in a known
  file extension, after stripping quotes, a leading "./", pip extras ("[text]") and
  "::test" suffixes. It is checked when its first component is a top-level entry of the
  repository (not one .gitignore ignores, like build/ or .venv/), or, in a doc below the root,
  an entry of the doc's own folder (`include/pipo/runtime.h` in runtimes/cpp/README.md).
  Anything else (OUT/..., build/cpp/pipo-run, DIR/...) is a placeholder or a build output.
  A word whose first component is a package of the repository that is not at the top level
  (`pipo_runtime/...`, `cli/...`) is an error: docs write paths from the repository root.
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "runtimes" / "cpp" / "README.md", ROOT / "benchmarks" / "README.md"]
EXTENSIONS = (".py", ".md", ".json", ".toml", ".cfg", ".sh", ".cpp", ".h", ".txt", ".npz",
              ".png", ".yaml", ".yml", ".jinja", ".cmake")
README_MAX_LINES = 200
# what nothing in the repository may mention: the spec lives in docs/contract.md
OUTSIDE = ("../" + "shared", "PIPO" + "_SPEC")

FENCE = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _ignored_names() -> list[str]:
    """Top-level names .gitignore excludes (build outputs, venvs), plus .git."""
    patterns = [".git"]
    for line in (ROOT / ".gitignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            patterns.append(line.strip("/"))
    return patterns


IGNORED = _ignored_names()


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in IGNORED)


TOP_LEVEL = {p.name for p in ROOT.iterdir() if not _ignored(p.name)}


def _packages() -> set[str]:
    """Names of the repository's Python packages that are not top-level entries."""
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        if "__init__.py" in files and Path(folder) != ROOT:
            names.add(Path(folder).name)
    return names - TOP_LEVEL


PACKAGES = _packages()


def _words(doc: Path) -> list[str]:
    """Path-like words of the doc's inline code spans."""
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    words = []
    for _, span in CODE_SPAN.findall(text):
        for word in span.split():
            word = word.strip("'\"`,;:()")
            word = re.sub(r"\[[^\]/]*\]$", "", word).split("::")[0].split("#")[0]
            if word.startswith("./"):
                word = word[2:]
            if not word or word.startswith(("-", "/", "~", "http:", "https:")) \
                    or any(c in word for c in "*<>{}|=$…") or "..." in word:
                continue
            if "/" in word or word.endswith(EXTENSIONS):
                words.append(word)
    return words


def _prose_paths(doc: Path) -> list[str]:
    """Repository paths written as plain text: words that start with a top-level entry and a
    "/" (`tests/model/test_regular.py` written without backticks)."""
    text = CODE_SPAN.sub(" ", FENCE.sub("", doc.read_text(encoding="utf-8")))
    text = re.sub(r"\[[^\]]*\]\([^)]*\)", " ", text)  # links: checked as links
    tops = "|".join(re.escape(t) for t in sorted(TOP_LEVEL))
    pattern = re.compile(rf"(?<![\w/.~-])((?:{tops})/[\w./-]*[\w/])")
    return [m.group(1).split("#")[0] for m in pattern.finditer(text)]


def _links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same page
        out.append(target.split("#")[0])
    return out


def _inside(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


def problems(doc: Path) -> list[str]:
    """Every path the doc names that is missing, outside the repository or package-relative."""
    found = []
    here = doc.parent
    for target in _links(doc):
        path = here / target
        if not _inside(path):
            found.append(f"link {target!r} leaves the repository")
        elif not path.exists():
            found.append(f"link {target!r} does not exist")
    for word in _prose_paths(doc):
        if not (ROOT / word).exists():
            found.append(f"{word} (plain text) does not exist")
    for word in _words(doc):
        first = word.split("/")[0]
        if word.startswith("../"):
            path = here / word
            if not _inside(path):
                found.append(f"`{word}` leaves the repository")
            elif not path.exists():
                found.append(f"`{word}` does not exist")
        elif first in TOP_LEVEL:
            if not (ROOT / word).exists():
                found.append(f"`{word}` does not exist")
        elif here != ROOT and (here / first).exists():
            if not (here / word).exists():
                found.append(f"`{word}` does not exist (from {here.relative_to(ROOT)})")
        elif first in PACKAGES:
            found.append(f"`{word}` is relative to a package; write it from the repository root")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc):
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    found = problems(doc)
    assert not found, "\n".join(found)


def test_the_readme_links_every_doc():
    """The front door leads to every page of the reference."""
    readme = ROOT / "README.md"
    linked = {(ROOT / t).resolve() for t in _links(readme)}
    missing = [str(d.relative_to(ROOT)) for d in DOCS[1:] if d.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_the_rule_catches_wrong_paths_and_spares_placeholders(tmp_path, monkeypatch):
    doc = ROOT / "docs" / "probe.md"
    text = ("`pipo_export/sampling.py`, `pipo_runtime/trt_engine.py`, [spec](../../shared/X.md), "
            "`tests/cli/test_bad_inputs.py::test_x`, `OUT/manifest.json`, `build/cpp/pipo-run`, "
            "`cmake -S runtimes/cpp -B build/cpp`, [cli](cli.md), `./runtimes/python[text]`, "
            "`tests/test_cpp.py`, `../shared/PIPO_SPEC.md`, `include/pipo/runtime.h`, "
            "see tests/test_regular.py, q/k/v, docs/cli.md.")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: text)
    assert sorted(problems(doc)) == sorted([
        "`pipo_export/sampling.py` does not exist",
        "`pipo_runtime/trt_engine.py` is relative to a package; write it from the repository root",
        "link '../../shared/X.md' leaves the repository",
        "`tests/test_cpp.py` does not exist",
        "`../shared/PIPO_SPEC.md` does not exist",
        "tests/test_regular.py (plain text) does not exist",
    ])


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def _text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        for name in files:
            path = Path(folder) / name
            if path.suffix in EXTENSIONS + (".cc", ".hpp", ".cfg") or name in ("Makefile", "run"):
                yield path


def test_nothing_points_outside_the_repository():
    """The model's spec is docs/contract.md: no file may point to a copy outside the repo."""
    me = Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}: {needle}" for p in _text_files() if p.resolve() != me
            for needle in OUTSIDE if needle in p.read_text(encoding="utf-8", errors="replace")]
    assert hits == []
