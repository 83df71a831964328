"""`speckv serve` as a real process, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from speckv import SamplingParams
from speckv.server.process import ServerProcess

openai = pytest.importorskip("openai")

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The harbour at dawn was quiet, and the fishing boats"


class Server(ServerProcess):
    """`speckv serve` on a small DEVICE tier, with the client helpers the tests use."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        super().__init__("--device-kv-bytes", "64MiB", *args, env=env)

    def client(self, key: str = "none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, path: str, body: bytes | dict) -> tuple[int, dict, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def reference(make_llm):
    """The in-process engine on the same options: what the server must answer."""
    llm = make_llm(device_kv_bytes="64MiB")
    yield llm
    llm.close()


# ---------------------------------------------------------------- the OpenAI API


def test_completion_is_the_engines_greedy_output_with_usage(server, reference):
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                             temperature=0)
    ref = reference.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))[0]
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.num_prompt_tokens
    assert out.usage.completion_tokens == ref.num_generated_tokens
    assert out.usage.total_tokens == ref.num_prompt_tokens + ref.num_generated_tokens


def test_chat_uses_the_chat_template(server, reference):
    messages = [{"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "What is the sea?"}]
    out = server.client().chat.completions.create(model=MODEL, messages=messages,
                                                  max_tokens=20, temperature=0)
    ref = reference.chat(messages, SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == ref.num_prompt_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_gives_the_same_text_then_usage_then_done(server, chat):
    client = server.client()
    args = dict(model=MODEL, max_tokens=20, temperature=0)
    if chat:
        args["messages"] = [{"role": "user", "content": PROMPT}]
        whole = client.chat.completions.create(**args).choices[0].message.content
        chunks = list(client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        args["prompt"] = PROMPT
        whole = client.completions.create(**args).choices[0].text
        chunks = list(client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(chunks) > 3 and text == whole
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_raw_stream_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_stop_string_cuts_the_text(server):
    client = server.client()
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    text = free.choices[0].text
    words = text.split()
    stop = words[len(words) // 2]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                    stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[:text.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == out.choices[0].text


def test_penalties_logit_bias_and_stop_token_ids_reach_the_engine(server, reference):
    client = server.client()
    forced = reference.tokenizer.encode(" harbour")[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == reference.tokenizer.decode([forced]) * 4
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5, presence_penalty=0.5)
    expected = reference.generate(PROMPT, params, use_tqdm=False)[0].text
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    presence_penalty=0.5,
                                    extra_body={"repetition_penalty": 1.5}).choices[0].text
    assert got == expected
    free = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    stop = free.token_ids[2]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"stop_token_ids": [stop]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == free.token_ids.index(stop) + 1


def test_seed_makes_sampling_reproducible(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_n_choices_with_logprobs_and_echo(server, reference):
    """Each choice is the in-process engine's with seed + i, its logprobs the engine's in
    OpenAI's completions shape; echo puts the prompt (and its tokens' logprobs) first."""
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2,
                                    temperature=0.9, seed=5, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    for i, choice in enumerate(out.choices):
        want = reference.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.9, seed=5 + i,
                                                         logprobs=2), use_tqdm=False)[0].outputs[0]
        assert choice.text == want.text
        lp = choice.logprobs
        assert "".join(lp.tokens) == want.text
        assert lp.token_logprobs == pytest.approx(
            [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-5)
        assert all(len(top) in (2, 3) and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                     echo=True, logprobs=1)
    choice = echo.choices[0]
    prompt_ids = reference.tokenizer.encode(PROMPT)
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == len(prompt_ids) + 3
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    want = reference.engine.score(prompt_ids).log_softmax(dim=-1)
    assert choice.logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(
        [want[p - 1, prompt_ids[p]].item() for p in range(1, len(prompt_ids))], abs=1e-4)


def test_chat_logprobs_and_streamed_choices(server, reference):
    client = server.client()
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2,
                                          temperature=1.0, seed=9, logprobs=True, top_logprobs=3)
    for choice in full.choices:
        content = choice.logprobs.content
        assert "".join(e.token for e in content) == choice.message.content
        for e in content:
            assert bytes(e.bytes).decode(errors="replace") == e.token
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2,
                                            temperature=1.0, seed=9, stream=True)
    texts, reasons = {0: "", 1: ""}, {}
    for event in stream:
        for c in event.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                assert c.index not in reasons  # once per choice
                reasons[c.index] = c.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    # developer messages are the system role of the template
    system = [{"role": "system", "content": "Answer briefly."}, messages[1]]
    want = reference.chat(system, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].text
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                         temperature=0)
    assert got.choices[0].message.content == want


def test_best_of_through_the_server(server, reference):
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2,
                                             best_of=3, temperature=1.0, seed=4)
    want = reference.generate(PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=4,
                                                     n=2, best_of=3), use_tqdm=False)[0]
    assert [c.text for c in out.choices] == [c.text for c in want.outputs]
    assert out.choices[0].logprobs is None


def test_response_format_holds_chat_output_to_json(server):
    client = server.client()
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 16},
                             "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
    messages = [{"role": "user", "content": "Describe a person called Ann who is 31."}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}})
    got = json.loads(out.choices[0].message.content)
    assert set(got) == {"name", "age"} and isinstance(got["age"], int)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48,
                                         temperature=0, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")
    regex = client.completions.create(model=MODEL, prompt="Is the sea salty? Answer:", max_tokens=4,
                                      temperature=0, extra_body={"guided_regex": " ?(yes|no)"})
    assert regex.choices[0].text.strip() in ("yes", "no")
    for body, param in [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
    ]:
        status, err, _ = server.post("/v1/chat/completions",
                                     {"model": MODEL, "messages": messages, "max_tokens": 4, **body})
        assert status == 400 and err["error"]["param"] == param, err


def test_a_repeated_prefix_is_reported_as_cached_tokens(server):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI's; cache_prompt=false opts out."""
    client = server.client()
    system = [{"role": "system", "content": "You are a lighthouse keeper. " * 12}]
    asks = [system + [{"role": "user", "content": q}] for q in ("Why the light?", "Any ships?")]
    first, second = (client.chat.completions.create(model=MODEL, messages=m, max_tokens=2)
                     for m in asks)
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0
    opted_out = client.chat.completions.create(model=MODEL, messages=asks[1], max_tokens=2,
                                               extra_body={"cache_prompt": False})
    assert opted_out.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.prompt_tokens_details.cached_tokens <= second.usage.prompt_tokens_details.cached_tokens
    m = server.wait_idle()
    assert 0 < m["speckv_prefix_cache_hit_rate"] <= 1
    assert m["speckv_engine_prefix_cache_hit_tokens_total"] >= second.usage.prompt_tokens_details.cached_tokens


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.get("/health") == (200, '{"status":"ok"}')
    m = server.wait_idle()
    assert m["speckv_device_pages_capacity"] > 0
    for name in ("speckv_time_to_first_token_seconds_count", "speckv_inter_token_latency_seconds_count",
                 "speckv_generation_tokens_per_second", 'speckv_tier_bytes{tier="device"}',
                 "speckv_generation_tokens_total"):
        assert name in m, name


def test_tokenize_and_detokenize_round_trip(server, reference):
    tokenizer = reference.engine.tokenizer
    status, out, _ = server.post("/v1/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert status == 200 and out["tokens"] == tokenizer.encode(PROMPT), out
    served = json.loads(server.get("/v1/models")[1])["data"][0]
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == served["max_model_len"]
    messages = [{"role": "user", "content": "hi"}]
    status, chat, _ = server.post("/v1/tokenize", {"messages": messages})
    assert status == 200 and chat["tokens"] == tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)), chat
    status, back, _ = server.post("/v1/detokenize", {"model": MODEL, "tokens": out["tokens"]})
    assert status == 200 and back == {"prompt": PROMPT}
    for body, param in [({"prompt": PROMPT, "messages": messages}, "messages"),
                        ({}, "messages"),
                        ({"prompt": PROMPT, "add_special_tokens": True}, "add_special_tokens"),
                        ({"model": "gpt-4", "prompt": PROMPT}, "model")]:
        status, err, _ = server.post("/v1/tokenize", body)
        assert status == 400 and err["error"]["param"] == param, (body, err)
    for tokens in ([tokenizer.vocab_size], [-1], ["a"]):
        status, err, _ = server.post("/v1/detokenize", {"tokens": tokens})
        assert status == 400 and err["error"]["param"].startswith("tokens"), (tokens, err)


# ---------------------------------------------------------------- bad input


BAD = [
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 9000}, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": PROMPT, "n": 0}, "n"),
    ({"model": MODEL, "prompt": PROMPT, "n": 500}, "n"),
    ({"model": MODEL, "prompt": PROMPT, "n": 2, "best_of": 1}, "best_of"),
    ({"model": MODEL, "prompt": PROMPT, "best_of": 3, "stream": True}, "best_of"),
    ({"model": MODEL, "prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": PROMPT, "logprobs": True}, "logprobs"),
    ({"model": MODEL, "prompt": PROMPT, "suffix": "x"}, "suffix"),
    ({"model": MODEL, "prompt": PROMPT, "max_token": 5}, "max_token"),  # misspelt: not ignored
    ({"model": MODEL, "prompt": PROMPT, "stop": [""]}, "stop"),
    ({"model": MODEL, "prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"model": MODEL, "prompt": PROMPT, "seed": "x"}, "seed"),
    ({"model": MODEL, "prompt": PROMPT, "token_budget": 0}, "token_budget"),
    ({"model": MODEL, "prompt": PROMPT, "selector": "nope"}, "selector"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
    ({"model": MODEL, "prompt": [1] * 8192}, "prompt"),
    ({"model": MODEL}, "prompt"),
    ({"model": "gpt-4", "prompt": PROMPT}, "model"),
    ({"prompt": PROMPT}, "model"),
    ({"model": MODEL, "prompt": PROMPT, "presence_penalty": 3}, "presence_penalty"),
    ({"model": MODEL, "prompt": PROMPT, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": PROMPT, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "prompt": PROMPT, "min_tokens": -1}, "min_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"model": MODEL, "prompt": PROMPT, "min_p": 2}, "min_p"),
    ({"model": MODEL, "prompt": PROMPT, "cache_prompt": "no"}, "cache_prompt"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_completion_requests_are_400_naming_the_field(server, body, param):
    status, err, _ = server.post("/v1/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == param, err
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
      "top_logprobs": 21}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "ann"}]},
     "messages[0].name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "grammar"}}, "response_format"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 9000}]}, "messages"),
])
def test_bad_chat_requests_are_400_naming_the_field(server, body, param):
    status, err, _ = server.post("/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == param, err


# what each endpoint honours of the official client's request fields (each has its own
# tests); everything else the client can send must be refused by name
HONOURED = {
    "/v1/completions": {"best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                        "max_tokens", "model", "n", "presence_penalty", "prompt", "seed",
                        "stop", "stream_options", "temperature", "top_p", "user"},
    "/v1/chat/completions": {"frequency_penalty", "logit_bias", "logprobs",
                             "max_completion_tokens", "max_tokens", "messages", "model", "n",
                             "presence_penalty", "response_format", "seed", "stop",
                             "stream_options", "temperature", "top_logprobs", "top_p", "user"},
}
REFUSED_BY_VALUE = {"/v1/completions": {"suffix"},  # declared, a 400 when given (BAD above)
                    "/v1/chat/completions": {"tools", "tool_choice"}}


@pytest.mark.parametrize("route", sorted(HONOURED))
def test_every_field_of_the_official_client_is_honoured_or_refused_by_name(server, route):
    """The table is openai's own request types: a field a newer client adds is refused
    until it is built, never ignored."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    from speckv.server.protocol import ChatCompletionRequest, CompletionRequest

    chat = route == "/v1/chat/completions"
    fields = set((chat_create_params if chat else completion_create_params)
                 .CompletionCreateParamsBase.__annotations__)
    declared = set((ChatCompletionRequest if chat else CompletionRequest).model_fields)
    assert fields & declared == HONOURED[route] | REFUSED_BY_VALUE[route]
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": PROMPT})
    for field in sorted(fields - declared):
        status, err, _ = server.post(route, {**base, field: True})
        assert status == 400 and err["error"]["param"] == field, (field, err)
        assert "not supported" in err["error"]["message"]
    status, body, _ = server.post(route, base)  # and the server goes on
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_malformed_json_oversized_body_and_the_server_goes_on(server):
    status, err, _ = server.post("/v1/completions", b'{"model": "x", "prompt": ')
    assert status == 400 and "malformed JSON" in err["error"]["message"]
    status, err, _ = server.post("/v1/completions", b"x" * (2 << 20))
    assert status == 413 and err["error"]["code"] == "body_too_large"
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().completions.create(model="gpt-4", prompt=PROMPT)
    assert exc.value.body["code"] == "model_not_found"
    out = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert out.usage.completion_tokens == 3


# ---------------------------------------------------------------- lifecycle


def test_disconnect_mid_stream_aborts_and_frees_the_pages(server):
    before = server.metrics()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT * 20, "max_tokens": 1000, "ignore_eos": True,
         "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(5):  # a few tokens arrive: the request holds pages now
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    busy = server.metrics()
    assert busy["speckv_device_pages_free"] < busy["speckv_device_pages_capacity"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = server.wait_idle()
    assert after["speckv_requests_aborted_total"] == before["speckv_requests_aborted_total"] + 1
    assert after["speckv_generation_tokens_total"] - before["speckv_generation_tokens_total"] < 1000


def test_concurrent_streams_each_complete_once_and_leave_nothing(server):
    client = server.client()
    prompts = [PROMPT * k for k in (1, 2, 4, 8, 1, 3, 6, 12, 2, 5, 9, 1)]
    results: dict[int, list] = {}
    errors = []

    def run(i):
        try:
            chunks = list(client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=8 + i, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            results.setdefault(i, []).append(chunks)
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == list(range(len(prompts)))
    for i, runs in results.items():
        assert len(runs) == 1
        chunks = runs[0]
        assert chunks[-1].usage.completion_tokens == 8 + i
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    server.wait_idle()


def test_log_requests_and_the_stats_line():
    srv = Server("--log-requests", "--stats-interval", "0.5")
    try:
        client = srv.client()
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 30
        while "request cmpl-" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        line = next(x for x in srv.output().splitlines() if "request cmpl-" in x)
        assert f"{out.usage.prompt_tokens} prompt tokens (0 cached), 40 generated" in line
        assert "ttft" in line and line.endswith("length")
        stats = [x for x in srv.output().splitlines() if "generation" in x and "tokens/s" in x]
        assert stats and "running" in stats[0] and "DEVICE KV" in stats[0], srv.output()
    finally:
        assert srv.stop() == 0


def test_api_key_is_required_on_v1_when_set():
    s = Server(env={"SPECKV_API_KEY": "sesame"})
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        status, err, _ = s.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert s.get("/health")[0] == 200  # not an API route
        out = s.client("sesame").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert out.usage.completion_tokens == 2
    finally:
        assert s.stop() == 0


def test_full_queue_answers_429_with_retry_after():
    s = Server("--max-num-seqs", "1", "--max-waiting", "1")
    try:
        client = s.client()
        running = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1000,
                                            stream=True, extra_body={"ignore_eos": True})
        next(iter(running))  # it runs: the one batch place is taken
        waiting = threading.Thread(target=lambda: client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 30
        while s.metrics()["speckv_requests_waiting"] < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        status, err, headers = s.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
        assert status == 429 and err["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
        running.close()  # the client goes away: the queued request runs and finishes
        waiting.join(timeout=60)
        assert not waiting.is_alive()
        assert s.wait_idle()["speckv_requests_rejected_total"] == 1
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_pool_failure_fails_the_request_with_500_and_the_server_goes_on(tmp_path):
    from test_memnode import Node

    node = Node(str(tmp_path / "memnode.sock"))
    node.start()
    s = Server("--pool", "memnode", "--memnode-socket", node.socket, "--device-kv-bytes",
               str(3 * 30 * 24_576 * 2), "--pool-bytes", "32MiB")
    try:
        client = s.client()
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        node.kill()
        with pytest.raises(openai.APIError) as exc:
            list(stream)
        assert "pool" in str(exc.value)
        with pytest.raises(openai.InternalServerError) as exc:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40)
        assert "pool" in exc.value.body["message"]
        node.start()
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40)
        assert out.usage.completion_tokens == 40
        s.wait_idle()
    finally:
        assert s.stop() == 0
        node.stop()


def test_sigterm_drains_in_flight_requests_and_exits_0():
    s = Server("--shutdown-grace-seconds", "60")
    client = s.client()
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    s.proc.send_signal(signal.SIGTERM)
    rest = list(stream)  # the in-flight request still finishes
    assert [c.choices[0].finish_reason for c in rest][-1] == "length"
    assert len([first, *rest]) >= 30
    assert s.proc.wait(timeout=60) == 0
    with pytest.raises(OSError):
        s.get("/health")


def test_serve_rejects_bad_options():
    run = [sys.executable, "-m", "speckv.cli", "serve"]
    for args, word in ((["--port", "70000"], "port"), (["--max-waiting", "-1"], "max_waiting"),
                       (["--api-key", ""], "api_key"), (["--selector", "nope"], "selector"),
                       (["--api-key-file", "/nonexistent/key"], "api_key_file"),
                       (["--stats-interval", "-1"], "stats_interval")):
        p = subprocess.run(run + args, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and word in p.stderr, (args, p.stderr)


# ---------------------------------------------------------------- hardening


def read_stream(server: Server, body: dict) -> list[str]:
    """The raw SSE events of one streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return [e for e in resp.read().decode().split("\n\n") if e]


def stream_text(events: list[str]) -> str:
    chunks = [json.loads(e[len("data: "):]) for e in events if e != "data: [DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def test_hostile_requests_mid_batch_fail_or_finish_alone(server):
    normal = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
              "ignore_eos": True}
    solo = stream_text(read_stream(server, normal))
    hostile = [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-320},
               {"top_k": 2**63}, {"seed": 2**70}, {"seed": -1}]
    results: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, read_stream(
        server, normal))) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the normal streams are decoding
    for extra in hostile:
        status, body, _ = server.post("/v1/completions", {**normal, "max_tokens": 4,
                                                           "temperature": 1.0, **extra})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, (extra, body)
    for bad in ([-1], [2**40], [2**70], [1, "x"]):
        status, body, _ = server.post("/v1/completions", {**normal, "prompt": bad})
        assert status == 400 and body["error"]["param"] == "prompt", (bad, body)
    for t in threads:
        t.join(timeout=120)
    assert [stream_text(results[i]) for i in range(3)] == [solo] * 3
    assert all(r[-1] == "data: [DONE]" for r in results.values())
    assert server.get("/health")[0] == 200
    server.wait_idle()


def test_shutdown_ends_every_unfinished_stream_with_an_error_and_done():
    s = Server("--shutdown-grace-seconds", "2")
    try:
        long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
        results: dict[int, list[str]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, read_stream(
            s, long))) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while s.metrics()["speckv_requests_running"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError) as exc:  # draining: answered, not refused
            s.get("/health")
        assert exc.value.code == 503
        status, err, _ = s.post("/v1/completions", long)
        assert status == 503 and err["error"]["type"] == "server_error"
        for t in threads:
            t.join(timeout=60)
        assert s.proc.wait(timeout=60) == 0
        assert sorted(results) == [0, 1, 2]
        for events in results.values():
            assert events[-1] == "data: [DONE]"
            last = json.loads(events[-2][len("data: "):])
            assert "shut down" in last["error"]["message"], last
    finally:
        s.stop()


@pytest.mark.slow
def test_a_stopped_memory_node_fails_requests_within_the_deadline_and_recovers(tmp_path):
    from test_memnode import Node

    node = Node(str(tmp_path / "memnode.sock"))
    node.start()
    s = Server("--pool", "memnode", "--memnode-socket", node.socket, "--memnode-timeout", "2",
               "--device-kv-bytes", str(3 * 30 * 24_576 * 2), "--pool-bytes", "32MiB")
    try:
        client = s.client()
        assert client.completions.create(model=MODEL, prompt=PROMPT * 4,
                                         max_tokens=8).usage.completion_tokens == 8
        assert "# TYPE speckv_stall_seconds_total counter" in s.get("/metrics")[1]
        node.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as exc:
            client.completions.create(model=MODEL, prompt=PROMPT * 4, max_tokens=40)
        assert "memory node" in exc.value.body["message"]
        assert time.monotonic() - started < 10, "a stopped node held the request too long"
        with pytest.raises(urllib.error.HTTPError) as exc:
            s.get("/health")
        assert exc.value.code == 503 and "pool unavailable" in exc.value.read().decode()
        assert s.metrics()["speckv_pool_available"] == 0
        node.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while True:  # the idle engine's pool check (or the next request) reconnects
            try:
                out = client.completions.create(model=MODEL, prompt=PROMPT * 4, max_tokens=8)
                break
            except openai.InternalServerError:
                assert time.monotonic() < deadline, "never recovered after SIGCONT"
                time.sleep(0.5)
        assert out.usage.completion_tokens == 8
        deadline = time.monotonic() + 10
        while s.metrics()["speckv_pool_available"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert s.get("/health")[0] == 200
    finally:
        node.proc.send_signal(signal.SIGCONT)
        assert s.stop() == 0
        node.stop()


def test_api_key_from_a_file_and_a_warning_for_one_on_the_command_line(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    key_file.chmod(0o600)
    s = Server("--api-key-file", str(key_file))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("from-a-file").models.list().data[0].id == MODEL
    finally:
        assert s.stop() == 0
    s = Server("--api-key", "on-the-command-line")
    try:
        assert s.client("on-the-command-line").models.list().data[0].id == MODEL
        assert "visible to other local users" in s.output()
    finally:
        assert s.stop() == 0


def test_metrics_counters_are_counters_and_no_series_is_exported_twice(server):
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = server.get("/metrics")[1]
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert types["speckv_engine_preemptions_total"] == "counter"
    assert types["speckv_generation_tokens_total"] == "counter"
    assert types["speckv_requests_running"] == "gauge"
    assert types["speckv_kv_cache_usage_ratio"] == "gauge"
    assert "speckv_engine_requests_running" not in types  # named once, not twice
    assert not [n for n, t in types.items() if t == "gauge" and n.endswith("_total")]
    samples = [line.rsplit(" ", 1)[0] for line in text.splitlines()
               if line and not line.startswith("#")]
    assert len(samples) == len(set(samples)), "a series is exported twice"
    m = server.wait_idle()
    assert m["speckv_kv_cache_usage_ratio"] == 0.0
    assert m["speckv_engine_preemptions_total"] == 0  # these requests fit the default DEVICE tier
