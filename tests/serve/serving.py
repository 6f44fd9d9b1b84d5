"""Shared pieces of the server tests: a tiny export with a tokenizer, chat template and
generation_config.json; a real server in a subprocess on a free 127.0.0.1 port; solo runs
through PipoSession to compare responses with."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from conftest import export_folder

CHAT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system="You are a tiny model.") -%}
{%- if messages[0].role == "system" -%}{%- set ns.system = messages[0].content -%}{%- endif -%}
<|im_start|>system
{{ ns.system }}{% if tools %}
 Tools: {{ tools | tojson }}{% endif %} Today: {{ strftime_now("%Y-%m-%d") }}<|im_end|>
{% for message in messages -%}
{%- if message.role not in ("system", "user", "assistant") -%}
{{- raise_exception("unknown role " ~ message.role) -}}
{%- endif -%}
{%- if message.role == "system" -%}{%- continue -%}{%- endif -%}
<|im_start|>{{ message.role }}
{% if message.role == "assistant" %}
{% generation %}{{ message.content }}{% endgeneration %}
{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor -%}
{% if add_generation_prompt %}
  {% set header = "<|im_start|>assistant" %}
{{ header }}
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{% endif %}"""
GENERATION_CONFIG = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
                     "max_new_tokens": 24, "eos_token_id": 318, "pad_token_id": 319}
API_KEY = "test-key"


def write_chat_checkpoint(folder: Path) -> Path:
    """A tiny random checkpoint (byte-level BPE tokenizer.json sized to its vocab) with a chat
    template in tokenizer_config.json and sampling defaults in generation_config.json."""
    from pipo_export.model.synthetic import TinyLayout, write_tiny_checkpoint
    write_tiny_checkpoint(folder, TinyLayout(), seed=5)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|eos|>",
        "eos_token": "<|eos|>", "pad_token": "<|pad|>", "chat_template": CHAT_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return folder


@pytest.fixture(scope="session")
def chat_export(tmp_path_factory) -> Path:
    ck = write_chat_checkpoint(tmp_path_factory.mktemp("ck") / "chat-tiny")
    cache = tmp_path_factory.getbasetemp() / "trace-cache"
    return export_folder(tmp_path_factory.mktemp("exports") / "chat-tiny", ck, cache)


@pytest.fixture(scope="session")
def solo_session(chat_export):
    from pipo_runtime import PipoSession
    session = PipoSession.load(chat_export)
    yield session
    session.close()


def solo(session, prompt_ids: list[int], config, seq: int = 0):
    """The same request alone through PipoSession (the choice's sequence index as seq_offset)."""
    return session.generate([prompt_ids], replace(config, seq_offset=seq)).sequences[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m pipo_runtime.serve OUT ARGS` on a free 127.0.0.1 port."""

    def __init__(self, out: Path, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipo_runtime.serve", str(out), "--port", str(self.port),
             *args], stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become healthy: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        """Every unlabelled sample of /metrics, parsed with prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if not s.labels}

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` (None: it was sent already) and wait; -> the exit code."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
