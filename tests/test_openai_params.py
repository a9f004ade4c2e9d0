"""OpenAI parameters `edgemoe serve` does not honour are refused with a 400 naming them, through the `openai`
client; the honoured ones, and the unhonoured ones at values that ask for nothing, still work."""

from __future__ import annotations

import openai
import pytest
from test_server import KEY, start_server, stop_server

PROMPT = "The capital of France is"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    packed = models.packed("qwen3_moe", True)
    srv = start_server(packed, tmp_path_factory.mktemp("serve") / "server.log", "--api-key", KEY)
    try:
        yield srv
    finally:
        stop_server(srv.proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def chat(client: openai.OpenAI, model: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                          temperature=0, **kw)


def complete(client: openai.OpenAI, model: str, **kw):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, **kw)


CHAT_REFUSED = [
    ("tools", {"tools": [TOOL]}),
    ("tool_choice", {"tool_choice": "auto"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("logprobs", {"logprobs": True}),
    ("top_logprobs", {"top_logprobs": 2}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("frequency_penalty", {"frequency_penalty": -0.5}),
    ("logit_bias", {"logit_bias": {"1": 5}}),
    ("top_k", {"extra_body": {"top_k": 5}}),
    ("stream_options", {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}}),
]
COMPLETION_REFUSED = [
    ("echo", {"echo": True}),
    ("best_of", {"best_of": 2}),
    ("suffix", {"suffix": " and so on"}),
    ("logprobs", {"logprobs": 0}),  # legacy completions: 0 still asks for the chosen token's logprob
    ("logprobs", {"logprobs": 3}),
    ("presence_penalty", {"presence_penalty": 1}),
    ("logit_bias", {"logit_bias": {"1": -100}}),
]


def assert_refused(call, name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    assert info.value.status_code == 400
    assert error["param"] == name and f"'{name}'" in error["message"], error


@pytest.mark.parametrize("name, kw", CHAT_REFUSED, ids=[c[0] for c in CHAT_REFUSED])
def test_chat_refuses_what_it_does_not_honour(server, client, name, kw):
    assert_refused(lambda: chat(client, server.model_id, **kw), name)


@pytest.mark.parametrize("name, kw", COMPLETION_REFUSED, ids=[f"{c[0]}={list(c[1].values())[0]}"
                                                               for c in COMPLETION_REFUSED])
def test_completions_refuse_what_they_do_not_honour(server, client, name, kw):
    assert_refused(lambda: complete(client, server.model_id, **kw), name)


def test_neutral_values_and_honoured_parameters_still_work(server, client):
    chat_plain = plain = chat(client, server.model_id)
    neutral = chat(client, server.model_id, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                   response_format={"type": "text"}, logprobs=False, tool_choice="none", user="someone", seed=3,
                   top_p=1, stop=["\n\n\n"], n=1)
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    assert neutral.usage.completion_tokens == plain.usage.completion_tokens > 0
    plain = complete(client, server.model_id)
    neutral = complete(client, server.model_id, echo=False, best_of=1, suffix=None, logprobs=None,
                       frequency_penalty=0)
    assert neutral.choices[0].text == plain.choices[0].text
    stream = chat(client, server.model_id, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat_plain.usage.completion_tokens
