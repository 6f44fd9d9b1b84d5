"""The real server (subprocess, free 127.0.0.1 port, tiny export with a tokenizer and chat
template) driven by the real `openai` client: responses equal solo PipoSession runs, streams,
stop strings, errors, cancellation, metrics, SIGTERM."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from pipo_graphs import SamplingParams
from pipo_runtime import GenerationConfig
from pipo_runtime.serve.chat import ChatTemplate

from serving import (API_KEY, GENERATION_CONFIG, Server, chat_export,  # noqa: F401
                     solo, solo_session)

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What does PIPO fold?"}]
MESSAGES2 = [{"role": "user", "content": "Name the two graphs."},
             {"role": "assistant", "content": "prefill compress"},
             {"role": "user", "content": [{"type": "text", "text": "and the other?"}]}]
# what a request gets for a parameter it does not set: the export's generation_config.json
GEN_DEFAULTS = dict(temperature=GENERATION_CONFIG["temperature"], top_p=GENERATION_CONFIG["top_p"],
                    top_k=GENERATION_CONFIG["top_k"], min_p=0.0, presence_penalty=0.0,
                    repetition_penalty=1.0)


@pytest.fixture(scope="module")
def server(chat_export, tmp_path_factory):
    s = Server(chat_export, "--max-batch", "4", "--api-key", API_KEY,
               log=tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    assert s.stop() == 0, s.output()


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", API_KEY),
                         max_retries=0, timeout=kw.pop("timeout", 120), **kw)


def call(server, req: dict) -> list[dict]:
    """One request through the openai client -> per choice {text, tokens, finish}."""
    req = dict(req)
    kind = req.pop("kind")
    extra = dict(req.pop("extra_body", {}), return_token_ids=True)
    c = client(server)
    api = c.completions if kind == "completion" else c.chat.completions
    model = c.models.list().data[0].id
    response = api.create(model=model, extra_body=extra, **req)
    if not req.get("stream"):
        return [{"text": ch.text if kind == "completion" else ch.message.content,
                 "tokens": ch.token_ids, "finish": ch.finish_reason,
                 "usage": response.usage.completion_tokens} for ch in response.choices]
    out: dict[int, dict] = {}
    for chunk in response:
        for ch in chunk.choices:
            o = out.setdefault(ch.index, {"text": "", "tokens": [], "finish": None})
            piece = ch.text if kind == "completion" else (ch.delta.content or "")
            o["text"] += piece
            o["tokens"] += getattr(ch, "token_ids", None) or []
            o["finish"] = ch.finish_reason or o["finish"]
    return [out[i] for i in sorted(out)]


def expected(session, req: dict) -> list[dict]:
    """The same request, choice by choice, alone through PipoSession."""
    tok = session.tokenizer
    if req["kind"] == "chat":
        kwargs = req.get("extra_body", {}).get("chat_template_kwargs", {})
        text = ChatTemplate.load(session.folder).render(req["messages"], True, **kwargs)
        prompts = [tok.encode(text, add_special_tokens=False).ids]
    else:
        p = req["prompt"]
        p = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        prompts = [tok.encode(x, add_special_tokens=False).ids if isinstance(x, str) else x
                   for x in p]
    extra = req.get("extra_body", {})
    sampling = dict(GEN_DEFAULTS)
    sampling.update({k: v for k, v in req.items() if k in GEN_DEFAULTS})
    sampling.update({k: v for k, v in extra.items() if k in GEN_DEFAULTS})
    config = GenerationConfig(max_new_tokens=req["max_tokens"], sampling=SamplingParams(**sampling),
                              seed=req.get("seed", 0), threshold=extra.get("threshold", -1.0))
    n, out = req.get("n", 1), []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            seq = solo(session, prompt, config, seq=i * n + j)
            out.append({"text": seq.text, "tokens": seq.tokens,
                        "finish": FINISH[seq.finish_reason]})
    return out


REQUESTS = [
    dict(kind="completion", prompt="PIPO folds each pair", temperature=0, max_tokens=20),
    dict(kind="completion", prompt=[[5, 17, 300, 2, 9], [44, 12]], temperature=0.9, seed=3,
         max_tokens=16,
         extra_body={"top_k": 40, "threshold": 0.3}),
    dict(kind="completion", prompt="The exporter writes", temperature=1.0, seed=11, n=2,
         max_tokens=12),
    dict(kind="completion", prompt=["servers and edge", "boxes"], temperature=0.7, seed=5,
         max_tokens=10, extra_body={"min_p": 0.05, "repetition_penalty": 1.2}),
    dict(kind="completion", prompt="Engineers ship", temperature=0.8, seed=7, top_p=0.95,
         max_tokens=18, stream=True),
    dict(kind="chat", messages=MESSAGES, temperature=0, max_tokens=16),
    dict(kind="chat", messages=MESSAGES2, temperature=0.6, seed=9, presence_penalty=0.5,
         max_tokens=14, stream=True),
    dict(kind="chat", messages=MESSAGES, temperature=0.9, seed=2, n=2, max_tokens=10,
         extra_body={"chat_template_kwargs": {"enable_thinking": False}}),
]


def test_concurrent_clients_equal_solo_runs(server, solo_session):
    """8 clients at once (greedy and seeded sampling, n>1, prompt lists, streams, chat): every
    choice's tokens, text and finish_reason equal the request run alone (exact)."""
    results, errors = [None] * len(REQUESTS), []
    start = threading.Barrier(len(REQUESTS))

    def worker(i):
        try:
            start.wait()
            results[i] = call(server, REQUESTS[i])
        except Exception as exc:  # reported below
            errors.append((i, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for req, got in zip(REQUESTS, results):
        want = expected(solo_session, req)
        assert [(g["tokens"], g["text"], g["finish"]) for g in got] == \
            [(w["tokens"], w["text"], w["finish"]) for w in want], req
        assert all(g.get("usage", sum(len(x["tokens"]) for x in got)) ==
                   sum(len(x["tokens"]) for x in got) for g in got)


def test_generation_config_defaults_and_usage(server, solo_session):
    """No sampling parameters: the export's generation_config.json (temperature 0.8, top_p 0.9,
    top_k 20, max_new_tokens 24) applies; usage counts prompt and generated tokens."""
    c = client(server)
    r = c.completions.create(model=c.models.list().data[0].id, prompt="Engineers ship these",
                             seed=4, extra_body={"return_token_ids": True})
    ids = solo_session.tokenizer.encode("Engineers ship these", add_special_tokens=False).ids
    want = expected(solo_session, dict(kind="completion", prompt=ids, seed=4,
                                       max_tokens=GENERATION_CONFIG["max_new_tokens"]))[0]
    assert (r.choices[0].token_ids, r.choices[0].text) == (want["tokens"], want["text"])
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want["tokens"])
    assert r.usage.total_tokens == len(ids) + len(want["tokens"])
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # no prefix cache yet


def test_chat_stream_deltas_join_to_the_text(server):
    c = client(server)
    kw = dict(model=c.models.list().data[0].id, messages=MESSAGES2, temperature=0.9, seed=21,
              max_tokens=30)
    full = c.chat.completions.create(**kw).choices[0].message.content
    stream = c.chat.completions.create(**kw, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == full and len([d for d in deltas if d]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_string_split_across_steps_never_streamed(server, solo_session):
    """A stop string made of the end of one step's text and the start of the next: the stream
    never shows it (nor a prefix of it later retracted); it equals the cut solo text."""
    c = client(server)
    kw = dict(model=c.models.list().data[0].id, prompt="The exporter writes two", seed=13,
              temperature=1.0, max_tokens=40, extra_body={"return_token_ids": True})
    pieces = [ch.choices[0].text for ch in c.completions.create(**kw, stream=True)
              if ch.choices and ch.choices[0].text]
    text = "".join(pieces)
    k = next(i for i in range(2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][:2]
    want = text[:text.find(stop)]
    streamed = [ch.choices[0].text for ch in c.completions.create(**kw, stream=True, stop=[stop])
                if ch.choices]
    assert stop not in "".join(streamed) and "".join(streamed) == want
    r = c.completions.create(**kw, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


def _post(server, path, body, key=API_KEY, timeout: float = 30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


BAD = {
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    "logprobs": ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    "logit_bias": ("/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"5": 1}},
                   400, "logit_bias"),
    "frequency_penalty": ("/v1/completions", {"prompt": "hi", "frequency_penalty": 0.5}, 400,
                          "frequency_penalty"),
    "temperature type": ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400,
                         "temperature"),
    "negative temperature": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, None),
    "prompt beyond context": ("/v1/completions", {"prompt": [7] * 5000}, 400, "prompt"),
    "explicit max_tokens beyond context": ("/v1/completions",
                                           {"prompt": [7] * 3000, "max_tokens": 1000}, 400, None),
    "id outside vocab": ("/v1/completions", {"prompt": [5, 100000]}, 400, None),
    "unknown parameter": ("/v1/completions", {"prompt": "hi", "best_of_n": 3}, 400, "best_of_n"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
                     400, None),
    "n zero": ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    "stream_options without stream": ("/v1/completions", {"prompt": "hi", "stream_options": {
        "include_usage": True}}, 400, "stream_options"),
    "missing prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "unknown route": ("/v1/embeddings", {"input": "hi"}, 404, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_openai_error(server, case):
    path, body, status, param = BAD[case]
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param, err
    assert httpx.get(server.url + "/health").status_code == 200


def test_transport_level_errors(server):
    assert _post(server, "/v1/completions", {"prompt": "hi"}, key="wrong").status_code == 401
    assert _post(server, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401
    r = httpx.post(server.url + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}",
                            "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        client(server).completions.create(model="chat-tiny", prompt="hi", logprobs=1)
    assert httpx.get(server.url + "/health").status_code == 200


def test_abandoned_requests_free_their_rows(server):
    """8 streams dropped after their first chunk and one non-streamed request whose client
    times out: every row is freed (requests_running back to 0) and each counts as cancelled."""
    before = server.metrics()["pipo_requests_cancelled_total"]
    body = {"prompt": "PIPO folds", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "temperature": 1.0}  # about 1000 steps: over a second, even alone
    for _ in range(8):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", dict(body, stream=False), timeout=0.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["pipo_requests_running"] == 0 and m["pipo_requests_waiting"] == 0:
            break
        time.sleep(0.2)
    assert m["pipo_requests_running"] == 0 and m["pipo_requests_waiting"] == 0
    assert m["pipo_requests_cancelled_total"] - before == 9


def test_metrics_parse_with_prometheus_client(server):
    assert _post(server, "/v1/completions", {"prompt": "PIPO", "max_tokens": 8}).status_code == 200
    m = server.metrics()
    for name in ("pipo_requests_running", "pipo_requests_waiting", "pipo_prompt_tokens_total",
                 "pipo_generation_tokens_total", "pipo_batch_rows", "pipo_padding_ratio",
                 "pipo_commit_rate", "pipo_prefix_cache_hits_total",
                 "pipo_requests_cancelled_total", "pipo_time_to_first_token_seconds_count",
                 "pipo_inter_token_latency_seconds_count",
                 "pipo_e2e_request_latency_seconds_count"):
        assert name in m, name
    assert m["pipo_generation_tokens_total"] > 0 and m["pipo_e2e_request_latency_seconds_count"] > 0
    assert 0 < m["pipo_commit_rate"] <= 1


def test_ignore_eos(server, solo_session):
    """A sampled run that ends at EOS; with ignore_eos the same run goes on to max_tokens."""
    ids = solo_session.tokenizer.encode("PIPO", add_special_tokens=False).ids
    for seed in range(200):
        config = GenerationConfig(max_new_tokens=60, sampling=SamplingParams(temperature=8.0),
                                  seed=seed)
        seq = solo(solo_session, ids, config)
        if seq.finish_reason == "eos":
            break
    else:
        pytest.skip("no seed reached EOS")
    body = {"prompt": ids, "max_tokens": 60, "temperature": 8.0, "seed": seed,
            "return_token_ids": True, "top_p": 1.0, "top_k": 0}
    stops = _post(server, "/v1/completions", body).json()["choices"][0]
    assert stops["finish_reason"] == "stop" and stops["token_ids"] == seq.tokens
    goes_on = _post(server, "/v1/completions", dict(body, ignore_eos=True)).json()["choices"][0]
    assert goes_on["finish_reason"] == "length" and len(goes_on["token_ids"]) == 60
    assert goes_on["token_ids"][:len(seq.tokens)] == seq.tokens
    assert GENERATION_CONFIG["eos_token_id"] in goes_on["token_ids"]


def _sse_data(lines) -> list[str]:
    return [x for x in lines if x.startswith("data: ")]


def test_full_queue_then_sigterm_drains(chat_export, tmp_path):
    """One row, a queue of one: a third request gets 429. SIGTERM while both run/wait: new
    requests get 503, the running and the waiting stream both finish, exit code 0."""
    s = Server(chat_export, "--max-batch", "1", "--max-queue", "1", "--drain-timeout", "120",
               log=tmp_path / "server.log")
    body = {"prompt": "PIPO folds", "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "temperature": 1.0}  # about 1000 steps: still running when the others come
    url = s.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=300) as running:
        first = running.iter_lines()
        head = [next(first)]
        with httpx.stream("POST", url, json=body, timeout=300) as waiting:
            assert waiting.status_code == 200
            full = httpx.post(url, json=dict(body, stream=False), timeout=30)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = httpx.post(url, json={"prompt": "hi"}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            rest = head + list(first)
            queued = list(waiting.iter_lines())
    for lines in (rest, _sse_data(queued)):
        data = _sse_data(lines)
        assert data[-1] == "data: [DONE]" and '"finish_reason": "length"' in data[-2]
    assert s.stop(sig=None) == 0, s.output()
