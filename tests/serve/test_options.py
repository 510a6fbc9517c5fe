"""OpenAI's request options through the official ``openai`` client: stop, n, seed, logprobs / top_logprobs,
stream_options.include_usage, response_format (json_object, json_schema: constrained decoding by llguidance),
tools / tool_choice through the model's chat template; and a 400 naming each field fourbit does not support.

The server here runs the tiny 4-bit llama with a Hermes-style chat template that shows tools to the model
(the shared server's template does not, which is tested too)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from _server import Server

TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n<tools>"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools>\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{%- for c in m.tool_calls %}\n<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"hour24": {"type": "boolean"}},
                                       "required": ["hour24"], "additionalProperties": False}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "boolean"},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tool_engine(model_dir):
    from fourbit.models import load_model
    from fourbit.serve import Engine

    model, tokenizer = load_model(model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    engine = Engine(model, tokenizer, model_name="tiny", context_window=2048)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def oc(tool_engine):
    """The official client against a server over ``tool_engine``."""
    from fourbit.serve import create_app

    with Server(create_app(tool_engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    from fourbit.models import load_model

    return load_model(model_dir)[0]


def reference_logprobs(model, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids from transformers' own generate, and the log-softmax of the model over each of them [n, vocab]."""
    ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, temperature=None,
                         top_p=None, top_k=None, eos_token_id=[])[0]
    with torch.no_grad():
        logits = model(ids[None]).logits[0, len(prompt_ids) - 1 : -1].float()
    return ids[len(prompt_ids):].tolist(), torch.log_softmax(logits, dim=-1)


def bad_request(call, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    assert info.value.body["param"] == param, info.value.body
    return info.value.body["message"]


# ---- stop, n, seed ------------------------------------------------------------------------------------
def test_chat_stop_cuts_the_reply(oc):
    text = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    whole = text.choices[0].message.content
    stop = next(whole[i : i + 2] for i in range(2, len(whole) - 1) if "\ufffd" not in whole[i : i + 2])
    cut = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stop=stop)
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_are_the_seeds_one_by_one(oc):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0)
    many = oc.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [oc.chat.completions.create(seed=11 + i, **kw) for i in range(3)]
    singles = [a.choices[0].message.content for a in alone]
    assert [c.message.content for c in many.choices] == singles  # choice i is seed + i, repeatable
    assert len(set(singles)) > 1  # and the choices differ
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once
    streamed = oc.chat.completions.create(n=3, seed=11, stream=True, **kw)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == singles


# ---- logprobs ------------------------------------------------------------------------------------------
def test_chat_logprobs_match_the_model(oc, tool_engine, reference):
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ids, want = reference_logprobs(reference, tool_engine.chat_prompt(MESSAGES), 6)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    tok = tool_engine.tokenizer
    for entry, token, row in zip(content, ids, want, strict=True):
        assert entry.token == tok.decode([token])
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3)
        top = torch.topk(row, 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
    plain = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=3, stream=True)
    chunks = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in chunks] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_match_the_model(oc, tool_engine, reference):
    prompt = "Once upon a time"
    reply = oc.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    ids, want = reference_logprobs(reference, tool_engine.encode(prompt), 5)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [tool_engine.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs == pytest.approx([float(r[t]) for t, r in zip(ids, want, strict=True)], abs=2e-3)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_top_logprobs_without_logprobs_and_stream_options_without_stream_are_400(oc):
    bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, top_logprobs=2),
                "top_logprobs")
    bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                                   stream_options={"include_usage": True}), "stream_options")
    bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, stream=True,
                                                   stream_options={"include_usage": True, "x": 1}),
                "stream_options.x")


def test_include_usage_on_completions_stream(oc):
    chunks = list(oc.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


# ---- response_format -----------------------------------------------------------------------------------
def test_json_schema_reply_is_valid_by_construction(oc):
    free = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # the tiny model does not write JSON by itself
        json.loads(free.choices[0].message.content)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0, seed=3, n=3,
                                       response_format=fmt)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), ANSWER)
    streamed = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=1.0, seed=3,
                                          response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reply.choices[0].message.content


def test_json_object_reply_is_a_json_object(oc):
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize(("fmt", "param"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 5}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": ANSWER}}, "response_format.json_schema.name"),
    ({"type": "grammar"}, "response_format.type"),
])
def test_bad_response_format_is_400_naming_the_field(oc, fmt, param):
    message = bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                                             response_format=fmt), param)
    assert "Traceback" not in message


# ---- tools ---------------------------------------------------------------------------------------------
def test_tools_reach_the_prompt_through_the_template(oc, tool_engine):
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
                                       tools=[WEATHER, TIME])
    want = tool_engine.tokenizer.apply_chat_template(MESSAGES, tools=[WEATHER, TIME], tokenize=False,
                                                     add_generation_prompt=True)
    assert '"get_weather"' in want
    assert reply.usage.prompt_tokens == len(tool_engine.encode(want))
    assert reply.choices[0].message.tool_calls is None  # "auto": the tiny model answers in text


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_forces_a_parsed_call(oc, stream):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=5, tools=[WEATHER, TIME],
              tool_choice=choice)
    if stream:
        calls, finish = {}, None
        for chunk in oc.chat.completions.create(stream=True, **kw):
            for delta_call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                calls[delta_call.index] = delta_call
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        calls = [calls[i] for i in sorted(calls)]
    else:
        reply = oc.chat.completions.create(**kw)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
        assert reply.choices[0].message.content is None
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_one_of_the_tools_and_the_reply_can_follow(oc, tool_engine):
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    follow = [*MESSAGES, reply.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = oc.chat.completions.create(model="tiny", messages=follow, max_tokens=3, temperature=0,
                                        tools=[WEATHER, TIME])
    rendered = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    want = tool_engine.tokenizer.apply_chat_template(rendered, tools=[WEATHER, TIME], tokenize=False,
                                                     add_generation_prompt=True)
    assert "<tool_response>sunny, 21 C</tool_response>" in want
    assert answer.usage.prompt_tokens == len(tool_engine.encode(want))


def test_parse_tool_calls_in_the_formats_models_write():
    from fourbit.serve.tools import parse_tool_calls

    names = {"get_weather", "get_time"}
    hermes = 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(hermes, names)
    assert content == "Let me look." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    for text in ['[TOOL_CALLS][{"name": "get_time", "arguments": {"hour24": true}}]',
                 '<|python_tag|>{"name": "get_time", "parameters": {"hour24": true}}',
                 '{"name": "get_time", "arguments": "{\\"hour24\\": true}"}']:
        content, calls = parse_tool_calls(text, names)
        assert content is None and [c["function"]["name"] for c in calls] == ["get_time"], text
        assert json.loads(calls[0]["function"]["arguments"]) == {"hour24": True}
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>[{"name": "get_weather", ' \
          '"arguments": {}}]</tool_call>'
    assert [c["function"]["name"] for c in parse_tool_calls(two, names)[1]] == ["get_time", "get_weather"]
    for text in ['{"name": "rm_rf", "arguments": {}}', "plain words", '{"answer": 3}']:
        assert parse_tool_calls(text, names) == (text, [])  # unknown tool, or no call: text


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "function", "function": {"parameters": {"type": "object"}}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": ""}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(oc, tools, choice, param):
    kw = {"tools": tools} if tools is not None else {}
    if choice is not None:
        kw["tool_choice"] = choice
    bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kw), param)


def test_tools_with_a_template_that_ignores_them_is_400(client):
    message = bad_request(lambda: client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                                                 tools=[WEATHER]), "tools")
    assert "chat template" in message


# ---- what fourbit does not support ---------------------------------------------------------------------
@pytest.mark.parametrize(("kw", "param"), [
    ({"logit_bias": {"65": 5}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1.0}, "presence_penalty"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
])
def test_unsupported_options_are_400_naming_them(oc, kw, param):
    message = bad_request(lambda: oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **kw),
                          param)
    assert message.startswith(f"{param}: ")
    if param != "audio":  # the client's completions take no audio
        with pytest.raises(openai.BadRequestError) as info:
            oc.completions.create(model="tiny", prompt="abc", max_tokens=2, **kw)
        assert info.value.body["param"] == param


def test_options_that_ask_for_nothing_are_accepted(oc):
    reply = oc.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, frequency_penalty=0,
                                       presence_penalty=0.0, user="someone", store=False, logit_bias={})
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert oc.completions.create(model="tiny", prompt="abc", max_tokens=2, echo=False, best_of=1).choices
