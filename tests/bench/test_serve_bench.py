"""The serving benchmark against llama-server (`python -m benchmarks.serve_vs_llamacpp`), the
pieces that need no server: token counting per streamed chunk, missing inputs (one line, exit
2), the servers' command lines, the table. No server is started here."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import serve_vs_llamacpp as bench
from benchmarks.serving import timings_count, token_ids_count


def chunk(texts=(), token_ids=None, timings=None):
    choices = [SimpleNamespace(text=t, **({} if token_ids is None else {"token_ids": ids}))
               for t, ids in zip(texts, token_ids or [None] * len(texts))]
    return SimpleNamespace(choices=choices, usage=None,
                           **({} if timings is None else {"timings": timings}))


def test_token_ids_count_takes_pairs():
    assert token_ids_count(chunk(["ab"], [[5, 6]]), 3) == (2, 5)
    assert token_ids_count(chunk(["", ""], [[7], []]), 5) == (1, 6)  # ids without text count
    assert token_ids_count(chunk([]), 6) == (0, 6)  # the usage chunk: no choices


def test_timings_count_follows_predicted_n():
    assert timings_count(chunk(["a"], timings={"predicted_n": 1}), 0) == (1, 1)
    # two tokens in one chunk: the first was held back inside a UTF-8 sequence
    assert timings_count(chunk(["\u00e9"], timings={"predicted_n": 3}), 1) == (2, 3)
    assert timings_count(chunk([""], timings={"predicted_n": 3}), 3) == (0, 3)  # final chunk
    assert timings_count(chunk(["x"]), 3) == (1, 4)  # no timings: one per chunk with text
    assert timings_count(chunk([""]), 4) == (0, 4)


def test_missing_inputs_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "manifest.json").write_text("{}")
    assert bench.main(["--export", str(tmp_path / "nothing")]) == 2
    assert bench.main(["--export", str(tmp_path / "exp"),
                       "--llama-server", str(tmp_path / "llama-server")]) == 2
    (tmp_path / "llama-server").write_text("")
    (tmp_path / "llama-server").chmod(0o755)
    assert bench.main(["--export", str(tmp_path / "exp"), "--llama-server",
                       str(tmp_path / "llama-server"), "--gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("python -m benchmarks.peers --peers llamacpp" in e
                                 for e in err)
    assert "no export" in err[0] and "no llama-server" in err[1] and "no GGUF" in err[2]


@pytest.mark.parametrize("bad", [["--servers", "vllm"], ["--clients", "0"],
                                 ["--new-tokens", "1"]])
def test_bad_options_exit_2(bad, capsys):
    assert bench.main(bad) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_server_commands():
    opts = bench.Options(export="exp", gguf="m.gguf", llama_server="ls", clients=[4],
                         prompt_tokens=100, new_tokens=20, threshold=0.5, llama_args="--poll 0")
    ours = bench.make_server("pipo", 4, opts, {})
    assert ours.cmd[ours.cmd.index("--max-batch") + 1] == "4"
    assert ours.extra_body == {"ignore_eos": True, "return_token_ids": True, "threshold": 0.5}
    llama = bench.make_server("llamacpp", 4, opts, {"cache_ram": True})
    assert llama.cmd[llama.cmd.index("-np") + 1] == "4"
    assert llama.cmd[llama.cmd.index("-c") + 1] == str(4 * (100 + 20 + bench.CTX_MARGIN))
    assert llama.cmd[llama.cmd.index("--host") + 1] == "127.0.0.1"
    assert llama.cmd[-4:] == ["--cache-ram", "0", "--poll", "0"]
    assert "--cache-ram" not in bench.make_server("llamacpp", 4, opts, {}).cmd
    assert llama.extra_body == {"ignore_eos": True, "timings_per_token": True}


def test_markdown_flags_disturbed_and_timed_out_rows():
    row = dict(clients=2, server="llamacpp", ok=3, sent=4, timed_out=True, tpot_ms_p50=3.5,
               output_tokens_per_s=10.0, ttft_ms_p50=1.0, ttft_ms_p99=2.0, itl_ms_p50=3.0,
               itl_ms_p99=4.0, server_cpu_s=5.0, server_cores=1.9, peak_rss_mib=100.0,
               others_cores=0.5)
    table = bench.markdown([row]).splitlines()
    assert len(table) == 3
    assert "3/4 (timed out)" in table[2] and "0.5 (disturbed)" in table[2]
