"""Tools and structured output through the official OpenAI SDK, on the default Qwen2.5 GGUF:
every call shape an agent sends, blocking and streaming (the stream's deltas must rebuild the
blocking answer exactly), `response_format` / `parse()` with a pydantic model, vLLM's
`structured_outputs`, and a 400 naming the field for every bad input."""
import json
from enum import Enum
from typing import List

import jsonschema_rs
import openai
import pydantic
import pytest
from conftest import API_KEY


@pytest.fixture(scope="module")
def client(qwen):
    return openai.OpenAI(base_url=qwen.base + "/v1", api_key=API_KEY, max_retries=0)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
ORDER_PARAMS = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 20},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "quantity"], "additionalProperties": False}},
    "shipping": {"type": "string", "enum": ["standard", "express"]}},
    "required": ["items", "shipping"], "additionalProperties": False}
ORDER = {"type": "function", "function": {
    "name": "place_order", "description": "Order items from the shop", "strict": True,
    "parameters": ORDER_PARAMS}}
WRITE_PARAMS = {"type": "object", "properties": {
    "path": {"type": "string", "maxLength": 40},
    "content": {"type": "string", "minLength": 500, "maxLength": 700}},
    "required": ["path", "content"], "additionalProperties": False}
WRITE = {"type": "function", "function": {
    "name": "write_file", "description": "Write a file", "strict": True, "parameters": WRITE_PARAMS}}


def ask(content):
    return [{"role": "user", "content": content}]


def streamed(client, **kw):
    """A streamed reply rebuilt from its chunks, checking OpenAI's delta rules on the way:
    each call's first delta has index, id, type, the whole name and `arguments: ""`; later
    ones carry argument text only; indices are dense from 0."""
    content, calls, finish = "", [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            if d.id is not None:
                assert d.index == len(calls), "indices are dense, in order"
                assert d.type == "function" and d.function.name and d.function.arguments == ""
                calls.append([d.id, d.function.name, ""])
            else:
                assert d.function.name is None and d.index == len(calls) - 1
                calls[d.index][2] += d.function.arguments
        finish = c.finish_reason or finish
    return content or None, [(n, a) for _, n, a in calls], finish


def both(client, **kw):
    """The blocking reply; the streamed one must be the same (ids aside)."""
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    whole = (m.content, [(t.function.name, t.function.arguments) for t in m.tool_calls or []],
             r.choices[0].finish_reason)
    assert all(t.id.startswith("call_") and t.type == "function" for t in m.tool_calls or [])
    assert streamed(client, **kw) == whole
    return whole


def test_one_call(client, qwen):
    content, calls, finish = both(client, model=qwen.name, messages=ask("What is the weather in Paris?"),
                                  tools=[WEATHER, CLOCK], temperature=0, max_tokens=80)
    assert finish == "tool_calls" and content is None
    assert len(calls) == 1 and calls[0][0] == "get_weather"
    args = json.loads(calls[0][1])
    assert "Paris" in args["city"] and args.get("unit", "celsius") in ("celsius", "fahrenheit")


def test_parallel_calls_and_required(client, qwen):
    kw = dict(model=qwen.name, messages=ask("What is the weather in Paris and in Tokyo?"),
              tools=[WEATHER, CLOCK], tool_choice="required", temperature=0, max_tokens=120)
    _, calls, finish = both(client, **kw)
    assert finish == "tool_calls"
    assert [n for n, _ in calls] == ["get_weather", "get_weather"]
    assert [json.loads(a)["city"] for _, a in calls] == ["Paris", "Tokyo"]
    # Not parallel: one call only, whatever the model would have liked.
    _, calls, _ = both(client, parallel_tool_calls=False, **kw)
    assert len(calls) == 1
    # `required` forces a call even when the question does not need one.
    _, calls, finish = both(client, model=qwen.name, messages=ask("Tell me a joke."), tools=[WEATHER],
                            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    assert finish == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather"


def test_named_function_and_no_parameters(client, qwen):
    named = {"type": "function", "function": {"name": "get_time"}}
    content, calls, finish = both(client, model=qwen.name, messages=ask("What is the weather in Paris?"),
                                  tools=[WEATHER, CLOCK], tool_choice=named, temperature=0, max_tokens=40)
    assert finish == "stop", "a named function finishes as stop, as OpenAI's does"
    assert content is None and calls == [("get_time", "{}")]


def test_nested_schema_with_arrays_and_enums(client, qwen):
    _, calls, _ = both(client, model=qwen.name, tools=[ORDER], tool_choice="required",
                       messages=ask("Order two apples (sku APL) and one pear (sku PR), express shipping."),
                       temperature=0, max_tokens=150)
    assert calls[0][0] == "place_order"
    args = json.loads(calls[0][1])
    jsonschema_rs.validate(ORDER_PARAMS, args)


def test_long_string_argument(client, qwen):
    _, calls, finish = both(client, model=qwen.name, tools=[WRITE],
                            tool_choice={"type": "function", "function": {"name": "write_file"}},
                            messages=ask("Write a Python module sort.py with quicksort, mergesort and tests."),
                            temperature=0, max_tokens=400)
    assert finish == "stop"
    args = json.loads(calls[0][1])
    jsonschema_rs.validate(WRITE_PARAMS, args)
    assert len(args["content"]) >= 500


def test_full_loop_call_result_answer(client, qwen):
    messages = ask("What is the weather in Paris?")
    r = client.chat.completions.create(model=qwen.name, messages=messages, tools=[WEATHER],
                                       temperature=0, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    # The SDK's own message object goes back as history (arguments as a JSON string).
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees Celsius, sunny"}]
    final = client.chat.completions.create(model=qwen.name, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=60)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"
    assert "18" in final.choices[0].message.content
    # The call and its result reached the prompt (with `none`, tools are not described).
    plain = client.chat.completions.create(model=qwen.name, messages=ask("What is the weather in Paris?"),
                                           tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert final.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_json_object_and_schema_parse(client, qwen):
    r = client.chat.completions.create(model=qwen.name, messages=ask("Describe a cat in JSON."),
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    class Color(str, Enum):
        red = "red"
        green = "green"
        blue = "blue"

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=30)
        age: int
        favourite_colors: List[Color] = pydantic.Field(max_length=3)

    p = client.chat.completions.parse(model=qwen.name, response_format=Person, temperature=0, max_tokens=120,
                                      messages=ask("Ann is 31 and likes red and blue. Give her as JSON."))
    person = p.choices[0].message.parsed
    assert isinstance(person, Person) and person.age == 31
    # Streaming the same schema gives the same text.
    kw = dict(model=qwen.name, temperature=0, max_tokens=120, messages=ask("Ann is 31. Give her as JSON."),
              response_format={"type": "json_schema", "json_schema": {
                  "name": "person", "strict": True, "schema": Person.model_json_schema()}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    assert streamed(client, **kw)[0] == whole
    Person.model_validate_json(whole)


def test_structured_outputs_regex_and_choice(client, qwen):
    r = client.chat.completions.create(model=qwen.name, messages=ask("Is the sky blue? Answer yes or no."),
                                       temperature=0, max_tokens=10,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=qwen.name, prompt="The phone number of the office is ",
                                  temperature=0.7, seed=3, max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}})
    import re
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param,words", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "not in tools"),
    (dict(tool_choice="required"), "tool_choice", "needs at least one tool"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools", "function.name"),
    (dict(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}),
     "response_format", "no-such-format"),
    (dict(extra_body={"structured_outputs": {"regex": "[0-9"}}), "structured_outputs.regex", "regex"),
    (dict(extra_body={"structured_outputs": {"grammar": "start: ("}}), "structured_outputs.grammar",
     "not a valid constraint"),
    (dict(response_format={"type": "json_object"}, tools=[WEATHER]), "response_format",
     "cannot be combined"),
])
def test_bad_input_is_a_400_naming_the_field(client, qwen, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=qwen.name, messages=ask("hi"), max_tokens=5, **kw)
    err = e.value.body
    assert err["param"] == param and words in err["message"], err
