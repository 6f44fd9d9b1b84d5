"""The chat template renders as transformers' apply_chat_template does; the export carries it
(and generation_config.json) sealed; request defaults; /health while loading; the CLI."""
from __future__ import annotations

import json
import shutil

import pytest

from pipo_graphs.manifest import load_manifest
from pipo_runtime.serve.chat import ChatTemplate, ChatTemplateError
from pipo_runtime.serve.config import GenerationDefaults, ServeConfig
from pipo_runtime.serve.state import generation_defaults

from serving import CHAT_TEMPLATE, GENERATION_CONFIG, chat_export  # noqa: F401

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is PIPO?"},
     {"role": "assistant", "content": "A pair model."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "Quote: \"tojson\" & <tags>", "name": None},
     {"role": "assistant", "content": "ok", "reasoning_content": "thinking..."}],
]


def _hf_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def test_export_carries_template_and_generation_config_sealed(chat_export):
    files = load_manifest(chat_export).files
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    assert json.loads((chat_export / "tokenizer_config.json").read_text())["chat_template"] \
        == CHAT_TEMPLATE


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_equals_transformers(chat_export, conversation, kwargs, add_generation_prompt):
    """Text and token ids equal transformers' apply_chat_template on the same messages."""
    messages = CONVERSATIONS[conversation]
    hf = _hf_tokenizer(chat_export)
    ours = ChatTemplate.load(chat_export).render(messages, add_generation_prompt, **kwargs)
    theirs = hf.apply_chat_template(messages, tokenize=False,
                                    add_generation_prompt=add_generation_prompt, **kwargs)
    assert ours == theirs
    from pipo_runtime import PipoSession
    tok = PipoSession.load(chat_export).tokenizer
    assert tok.encode(ours, add_special_tokens=False).ids == hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False,
        **kwargs)


def test_chat_template_jinja_file_wins(chat_export, tmp_path):
    """chat_template.jinja takes precedence over tokenizer_config.json, as in transformers."""
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(chat_export / name, folder / name)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    messages = CONVERSATIONS[1]
    ours = ChatTemplate.load(folder).render(messages)
    assert ours.startswith("[SYSTEM] Be brief.")
    assert ours == _hf_tokenizer(folder).apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=True)


def test_template_errors_are_user_errors(chat_export):
    template = ChatTemplate.load(chat_export)
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        template.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="role"):
        template.render([{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="text parts"):
        template.render([{"role": "user", "content": [{"type": "image_url"}]}])
    assert ChatTemplate.load(chat_export.parent) is None  # a folder without a template


def test_generation_defaults(chat_export, tmp_path):
    auto = generation_defaults(chat_export, GenerationDefaults.AUTO)
    assert (auto.temperature, auto.top_p, auto.top_k, auto.max_tokens) == \
        (GENERATION_CONFIG["temperature"], GENERATION_CONFIG["top_p"], GENERATION_CONFIG["top_k"],
         GENERATION_CONFIG["max_new_tokens"])
    none = generation_defaults(chat_export, GenerationDefaults.NONE)
    assert (none.temperature, none.top_p, none.top_k, none.max_tokens) == (1.0, 1.0, 0, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False,
                                                                "temperature": 0.6}))
    assert generation_defaults(tmp_path, GenerationDefaults.AUTO).temperature == 0.0


def test_health_is_503_until_loaded(chat_export):
    from fastapi.testclient import TestClient

    from pipo_runtime.serve.app import create_app
    from pipo_runtime.serve.state import ServerState

    app = create_app(ServeConfig(out=str(chat_export)))
    state = ServerState(ServeConfig(out=str(chat_export)))
    app.state.pipo = state  # the lifespan (which would load it) is not run by a bare client
    client = TestClient(app)
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
    state.load()
    assert client.get("/health").status_code == 200
    state.close()


def test_server_sessions_do_not_spin(chat_export):
    """The server's ONNX Runtime sessions run with intra-op spinning off (an idle server uses
    no CPU); a plain session keeps ORT's default."""
    from pipo_runtime import PipoSession
    from pipo_runtime.serve.state import ServerState
    state = ServerState(ServeConfig(out=str(chat_export)))
    state.load()
    key = "session.intra_op.allow_spinning"
    try:
        runner = state.session.runner
        assert [s.get_session_options().get_session_config_entry(key)
                for s in (runner.pre, runner.dec)] == ["0", "0"]
    finally:
        state.close()
    plain = PipoSession.load(chat_export)
    with pytest.raises(RuntimeError):  # no entry: ORT's default (spinning)
        plain.runner.pre.get_session_options().get_session_config_entry(key)
    plain.close()


def test_cli_flags(chat_export):
    """`pipo-export serve` and `python -m pipo_runtime.serve` share their flags; bad ones exit
    2 with one line."""
    import subprocess
    import sys

    from pipo_export.cli.parser import build_parser
    from pipo_runtime.serve.config import config_from_args
    argv = ["serve", str(chat_export), "--max-batch", "3", "--providers", "cpu",
            "--generation-config", "none"]
    ns = build_parser(argv).parse_args(argv)
    config = config_from_args(ns)
    assert (config.max_batch, config.providers, config.generation_config, config.port) == \
        (3, ("cpu",), GenerationDefaults.NONE, 8000)
    assert config.max_ongoing == 3 + 64
    for args, needle in (([str(chat_export), "--max-batch", "0"], "--max-batch"),
                         ([str(chat_export.parent), "--port", "1"], "manifest")):
        proc = subprocess.run([sys.executable, "-m", "pipo_runtime.serve", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


NO_TORCH = """
import sys
sys.modules['torch'] = None  # `import torch` raises ImportError
sys.modules['transformers'] = None
from fastapi.testclient import TestClient
from pipo_runtime.serve import ServeConfig, create_app
import pipo_runtime.serve.ray
with TestClient(create_app(ServeConfig(out=sys.argv[1]), load_in_background=False)) as client:
    r = client.post('/v1/chat/completions', json={'messages': [{'role': 'user', 'content': 'hi'}],
                                                 'max_tokens': 4})
    assert r.status_code == 200, r.text
    print(r.json()['usage']['completion_tokens'])
"""


def test_server_runs_without_torch(chat_export):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(chat_export)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4"
