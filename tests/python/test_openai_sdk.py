"""The official OpenAI Python SDK against inferd, unchanged: what existing clients rely on."""
import asyncio
import math

import openai
import pytest
from conftest import API_KEY


@pytest.fixture(scope="module")
def client(qwen):
    return openai.OpenAI(base_url=qwen.base + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def aclient(qwen):
    return openai.AsyncOpenAI(base_url=qwen.base + "/v1", api_key=API_KEY, max_retries=0)


def ask(content):
    return [{"role": "user", "content": content}]


def test_models_list(client, qwen):
    ids = [m.id for m in client.models.list()]
    assert ids == [qwen.name]


def test_chat_sync_and_raw_headers(client, qwen):
    raw = client.chat.completions.with_raw_response.create(
        model=qwen.name, messages=ask("What is the capital of France?"), temperature=0, max_tokens=20,
        extra_headers={"x-request-id": "req-abc"},
    )
    assert raw.headers["x-request-id"] == "req-abc"
    r = raw.parse()
    assert r.id == "chatcmpl-req-abc"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_async(aclient, qwen):
    async def go():
        rs = await asyncio.gather(*[
            aclient.chat.completions.create(model=qwen.name, messages=ask(q), temperature=0, max_tokens=16)
            for q in ["What is the capital of France?", "What is the capital of Japan?"]
        ])
        return [r.choices[0].message.content for r in rs]
    france, japan = asyncio.run(go())
    assert "Paris" in france and "Tokyo" in japan


def test_chat_stream_matches_non_stream_and_reports_usage(client, qwen):
    kw = dict(model=qwen.name, messages=ask("Name three fruits."), temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_sync_stream_and_token_prompts(client, qwen):
    r = client.completions.create(model=qwen.name, prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=qwen.name, prompt="def add(a, b):", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    ids = client.post("/../tokenize", body={"prompt": "def add(a, b):"}, cast_to=object)["tokens"]
    by_ids = client.completions.create(model=qwen.name, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    two = client.completions.create(model=qwen.name, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == r.choices[0].text[: len(two.choices[0].text)]
    echoed = client.completions.create(model=qwen.name, prompt="def add(a, b):", max_tokens=4,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("def add(a, b):")


def test_n_choices_and_seed_reproducibility(client, qwen):
    kw = dict(model=qwen.name, messages=ask("Write a random word."), temperature=1.0, max_tokens=8, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    streamed = {}
    for c in client.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
    assert [streamed[i] for i in range(3)] == [c.message.content for c in a.choices]


def test_chat_logprobs(client, qwen):
    r = client.chat.completions.create(model=qwen.name, messages=ask("Say hello."), temperature=0,
                                       max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token and math.isclose(t.top_logprobs[0].logprob, t.logprob)
        assert sum(math.exp(x.logprob) for x in t.top_logprobs) <= 1.0001
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_completion_logprobs(client, qwen):
    r = client.completions.create(model=qwen.name, prompt="The capital of France is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_and_penalties(client, qwen):
    r = client.completions.create(model=qwen.name, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text
    biased = client.completions.create(model=qwen.name, prompt="1, 2, 3, 4,", max_tokens=3, temperature=0,
                                       logit_bias={"20": 100})
    assert biased.choices[0].text == "555"  # token 20 is "5" in Qwen's vocabulary
    r = client.completions.create(model=qwen.name, prompt="Hi", max_tokens=6, temperature=0,
                                  frequency_penalty=2, presence_penalty=2, extra_body={"repetition_penalty": 1.3,
                                  "min_p": 0.1, "top_k": 20, "min_tokens": 6, "ignore_eos": True})
    assert r.usage.completion_tokens == 6


def test_typed_errors(client, qwen):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=qwen.name, messages=ask("hi"), temperature=5)
    assert "temperature must be in [0, 2], got 5" in str(e.value)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=qwen.name, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=qwen.name, prompt="hi", stream=False, stream_options={"include_usage": True})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ask("hi"))
    bad = openai.OpenAI(base_url=qwen.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
