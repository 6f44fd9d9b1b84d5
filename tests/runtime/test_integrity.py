"""Any changed byte of any export file (manifest.json and its manifest.sha256 included) is
refused at load, in one line, by pipo_runtime and by the C++ runtime; so are a missing seal and
an edited manifest that still parses (a new pad id)."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from pipo_graphs.errors import PipoUserError
from pipo_runtime import PipoSession

PIPO_RUN = Path(__file__).resolve().parents[2] / "build" / "cpp" / "pipo-run"
RUNTIMES = ("python", "cpp")


@pytest.fixture(scope="module")
def pristine(trt_export, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity") / "export"
    shutil.copytree(trt_export, folder)
    return folder


def _refusal(runtime: str, folder: Path) -> str:
    """The one-line refusal of loading `folder` (fails the test if it loads)."""
    if runtime == "python":
        with pytest.raises(PipoUserError) as err:
            PipoSession.load(folder).close()
        message = str(err.value)
    else:
        if not PIPO_RUN.is_file():
            pytest.skip("the C++ runtime is not built (make cpp)")
        proc = subprocess.run([str(PIPO_RUN), str(folder), "--ids", "5,17", "--max-steps", "2",
                               "--json"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
        message = proc.stderr
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message, message
    return message


def _flips(folder: Path, per_file: int = 3):
    """(file name, byte offset) for the first, last and one seeded random byte of each file."""
    rng = random.Random(7)
    for f in sorted(folder.iterdir()):
        size = f.stat().st_size
        for offset in sorted({0, size - 1, rng.randrange(size)})[:per_file]:
            yield f.name, offset


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_flipped_byte_is_refused(runtime, pristine, tmp_path):
    names = {f.name for f in pristine.iterdir()}
    assert {"manifest.json", "manifest.sha256", "weights.data"} <= names
    folder = tmp_path / "export"
    shutil.copytree(pristine, folder)
    for name, offset in _flips(pristine):
        path = folder / name
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        message = _refusal(runtime, folder)
        assert name.split(".")[0] in message or "manifest.sha256" in message, (name, message)
        shutil.copy(pristine / name, path)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_manifest_edits_and_missing_seal_are_refused(runtime, pristine, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(pristine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"]["pad_token_id"] += 1  # still valid JSON and schema; the tokens would change
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert "does not match its sha256 in manifest.sha256" in _refusal(runtime, folder)
    shutil.copy(pristine / "manifest.json", folder / "manifest.json")
    (folder / "manifest.sha256").unlink()
    assert "manifest.sha256: missing" in _refusal(runtime, folder)


def test_unreadable_export_file_is_one_line(pristine, tmp_path, monkeypatch):
    """A listed file that cannot be read (injected: everything here runs as root, so chmod
    cannot make a file unreadable) is a PipoUserError naming the file and the cause."""
    import builtins
    folder = tmp_path / "export"
    shutil.copytree(pristine, folder)
    real_open = builtins.open

    def deny(path, *args, **kw):
        if str(path).endswith("weights.data"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kw)
    monkeypatch.setattr(builtins, "open", deny)
    message = _refusal("python", folder)
    assert "weights.data: cannot be read (Permission denied)" in message
