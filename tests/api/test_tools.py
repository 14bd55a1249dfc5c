"""Tools on /v1/chat/completions with the openai client: "required" and a named function give a call whose
arguments validate against the function's parameters (greedy and sampled, streamed and not, n=2); "auto" and
"none" answer in a valid shape either way; the parser turns a model's text into calls (a JSON call, Hermes/Qwen
markers) or leaves it text; a conversation carrying tool calls and a tool result renders; refusals name the
field."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.api.schemas import ChatMessage, ChatTool
from server.api.tools import ToolStream, messages_extras, parse_auto, plan
from server.engine.chat import Conversation
from server.engine.errors import InvalidParameter

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
COUNT = {"type": "object", "additionalProperties": False, "required": ["n"],
         "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "count", "parameters": COUNT}}]
PARAMETERS = {"get_weather": WEATHER, "count": COUNT}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _plan(tool_choice="auto", tools=TOOLS):
    return plan([ChatTool.model_validate(t) for t in tools], tool_choice, tools)


# -- the parser, on crafted outputs ---------------------------------------------------------------------------

def test_a_bare_json_call_of_a_given_function_is_a_call():
    content, calls = parse_auto('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
                                PARAMETERS)
    assert content is None and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert calls[0].id.startswith("call_")
    # Llama's "parameters", a fenced block, a list of calls, OpenAI's own shape
    for text in ('  {"name": "count", "parameters": {"n": 3}}\n',
                 '```json\n{"name": "count", "arguments": {"n": 3}}\n```',
                 '<|python_tag|>{"name": "count", "arguments": "{\\"n\\": 3}"}',
                 '{"type": "function", "function": {"name": "count", "arguments": {"n": 3}}}'):
        content, calls = parse_auto(text, PARAMETERS)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("count", {"n": 3})], text
    content, calls = parse_auto('[TOOL_CALLS] [{"name": "count", "arguments": {"n": 1}}, '
                                '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]',
                                PARAMETERS)
    assert [c.name for c in calls] == ["count", "get_weather"] and calls[0].id != calls[1].id
    one = plan([ChatTool.model_validate(t) for t in TOOLS], "auto", TOOLS, parallel=False)
    assert [c.name for c in one.calls('[{"name": "count", "arguments": {"n": 1}}, {"name": "count", "arguments": '
                                      '{"n": 2}}]')[1]] == ["count"]


def test_hermes_markers_are_calls_and_the_text_before_them_is_content():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "count", "arguments": {"n": 2}}\n</tool_call>')
    content, calls = parse_auto(text, PARAMETERS)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome", "unit": "celsius"}), ("count", {"n": 2})]
    content, calls = parse_auto('<tool_call>{"name": "count", "arguments": {"n": 2}}', PARAMETERS)  # unclosed
    assert content is None and len(calls) == 1


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    "",
    '{"city": "Paris"}',  # JSON, but no call
    '{"name": "Ada", "age": 36}',  # a "name" that is no function's
    '{"name": "count", "arguments": {"n": 1}, "note": "extra"}',  # an object with more than a call
    '<tool_call>{"name": "count", "arguments": {"n": </tool_call>',  # a broken call
    '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # a function not given
    "[1, 2, 3]",
])
def test_anything_else_is_text(text):
    assert parse_auto(text, PARAMETERS) == (text, [])


def test_a_stream_sends_text_at_once_and_holds_back_what_may_be_a_call():
    plain = ToolStream(_plan())
    assert [plain.feed(p) for p in ("The ", "weather ", "is <tool", "_call> nice")] == [
        "The ", "weather ", "is ", ""]  # a marker's start is held back; text after a marker waits for the end
    assert plain.finish("The weather is <tool_call> nice") == ("<tool_call> nice", [])

    call = ToolStream(_plan())
    text = 'Sure. <tool_call>{"name": "count", "arguments": {"n": 4}}</tool_call>'
    sent = "".join(call.feed(text[i:i + 5]) for i in range(0, len(text), 5))
    rest, calls = call.finish(text)
    assert sent + rest == "Sure. " and [c.name for c in calls] == ["count"]

    bare = ToolStream(_plan())
    text = ' {"name": "count", "arguments": {"n": 4}}'
    assert "".join(bare.feed(text[i:i + 3]) for i in range(0, len(text), 3)) == ""
    assert bare.finish(text)[0] == "" and len(bare.finish(text)[1]) == 1

    json_text = ToolStream(_plan())
    assert json_text.feed('{"a": ') == "" and json_text.finish('{"a": 1}') == ('{"a": 1}', [])

    forced = ToolStream(_plan("required"))
    assert forced.feed('{"name": "count", ') == ""
    assert forced.finish('{"name": "count", "arguments": {"n": 7}}')[1][0].arguments == '{"n": 7}'
    none = ToolStream(_plan("none"))
    assert none.feed('{"name": "count", "arguments": {"n": 7}}') == '{"name": "count", "arguments": {"n": 7}}'
    assert none.finish('{"name": "count", "arguments": {"n": 7}}') == ("", [])


def test_the_plan_checks_tools_and_tool_choice():
    assert _plan().mode == "auto" and _plan(None).mode == "auto" and _plan("none").mode == "none"
    required = _plan("required")
    assert required.mode == "forced" and required.forced == ("get_weather", "count")
    assert json.loads(required.response_format().spec)["anyOf"][1]["properties"]["arguments"] == COUNT
    named = _plan({"type": "function", "function": {"name": "count"}})
    assert named.forced == ("count",) and named.param == "tools[1].function.parameters"
    assert _plan("none", tools=[{"type": "function", "function": {"name": "f"}}]).functions["f"]["type"] == "object"
    for tools, choice, param in (
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name"),
        ([TOOLS[0], TOOLS[0]], "auto", "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "auto",
         "tools[0].function.parameters"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (TOOLS, {"type": "function"}, "tool_choice.function"),
        ([], "auto", "tools"),
        ([{"type": "function", "function": {"name": "f", "description": "\ud800"}}], "auto",
         "tools[0].function.description"),
    ):
        with pytest.raises(InvalidParameter) as err:
            _plan(choice, tools)
        assert err.value.param == param, (tools, choice)
    with pytest.raises(InvalidParameter) as err:
        plan(None, "required", None)
    assert err.value.param == "tool_choice"
    assert plan(None, "none", None) is None


HERMES = ("{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
          "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
          "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_and_tool_messages_reach_the_chat_template(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = HERMES
    messages = [ChatMessage.model_validate(m) for m in (
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"})]
    conversation = Conversation(tuple((m.role, m.text()) for m in messages), True, _plan().rendered,
                                messages_extras(messages))
    text = conversation.with_system(None).render(tokenizer)
    assert "Tools: get_weather count" in text
    # the arguments as an object, as templates expect them (not a JSON string inside JSON)
    call = text[text.index("<tool_call>") + len("<tool_call>"):text.index("</tool_call>")]
    assert json.loads(call) == {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    assert "<|im_start|>tool\n18 degrees[call_1]<|im_end|>" in text
    # a task's system message opens it, and every message keeps its own fields
    assert "[call_1]" in conversation.with_system("Be brief.").render(tokenizer)
    with pytest.raises(InvalidParameter) as err:
        messages_extras([ChatMessage.model_validate({"role": "tool", "content": "18"})])
    assert err.value.param == "messages[0].tool_call_id"


# -- over HTTP, with the openai client ------------------------------------------------------------------------

def _streamed(chunks) -> list[dict]:
    """The choices of a streamed answer, reassembled as OpenAI's clients do: content appended, tool calls
    gathered by index (id, type and name set once, arguments appended)."""
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            choice = choices.setdefault(c.index, {"content": None, "tool_calls": {}, "finish_reason": None})
            if c.delta.content:
                choice["content"] = (choice["content"] or "") + c.delta.content
            for call in c.delta.tool_calls or []:
                into = choice["tool_calls"].setdefault(call.index, {"id": None, "name": None, "arguments": ""})
                into["id"] = call.id or into["id"]
                if call.function is not None:
                    into["name"] = call.function.name or into["name"]
                    into["arguments"] += call.function.arguments or ""
            if c.finish_reason:
                choice["finish_reason"] = c.finish_reason
    return [choices[i] for i in sorted(choices)]


def _answers(oa, stream: bool, **kw) -> list[dict]:
    """Each choice as {content, tool_calls: [{id, name, arguments}], finish_reason}, streamed or not."""
    if stream:
        return [{**c, "tool_calls": [c["tool_calls"][k] for k in sorted(c["tool_calls"])]}
                for c in _streamed(oa.chat.completions.create(stream=True, **kw))]
    done = oa.chat.completions.create(**kw)
    return [{"content": c.message.content, "finish_reason": c.finish_reason,
             "tool_calls": [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                            for t in c.message.tool_calls or []]} for c in done.choices]


def _assert_valid_call(answer: dict, names: tuple[str, ...]) -> None:
    assert answer["finish_reason"] == "tool_calls" and answer["content"] is None, answer
    [call] = answer["tool_calls"]
    assert call["name"] in names and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


@pytest.mark.parametrize("temperature", [0, 1.0])
@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_calls_are_valid_calls(oa, llama_server, temperature, stream):
    model = llama_server.settings.model_name()
    for choice, names in (("required", ("get_weather", "count")),
                          ({"type": "function", "function": {"name": "get_weather"}}, ("get_weather",)),
                          ({"type": "function", "function": {"name": "count"}}, ("count",))):
        answers = _answers(oa, stream, model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80,
                           temperature=temperature, seed=5, n=2)
        assert len(answers) == 2
        for answer in answers:
            _assert_valid_call(answer, names)


def test_a_streamed_call_comes_as_openais_deltas(oa, llama_server):
    chunks = list(oa.chat.completions.create(
        model=llama_server.settings.model_name(), messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == "tool_calls"
    [call] = last.choices[0].delta.tool_calls
    assert call.index == 0 and call.type == "function" and call.id.startswith("call_")
    assert chunks[-1].usage.completion_tokens > 0
    whole = oa.chat.completions.create(model=llama_server.settings.model_name(), messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=80, temperature=0)
    [whole_call] = whole.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == (whole_call.function.name, whole_call.function.arguments)
    with oa.chat.completions.stream(model=llama_server.settings.model_name(), messages=ASK, tools=TOOLS,
                                    tool_choice="required", max_tokens=80, temperature=0) as events:
        final = events.get_final_completion()  # the openai client's own accumulation of the deltas
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.arguments == whole_call.function.arguments


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", [None, "auto", "none"])
def test_auto_and_none_answer_text_or_a_call(oa, llama_server, tool_choice, stream):
    """A tiny random model will usually answer text: either way the shape is valid, and "none" never calls."""
    kw = {} if tool_choice is None else {"tool_choice": tool_choice}
    answers = _answers(oa, stream, model=llama_server.settings.model_name(), messages=ASK, tools=TOOLS,
                       max_tokens=12, temperature=1.0, seed=1, n=2, **kw)
    for answer in answers:
        if answer["tool_calls"]:
            assert tool_choice != "none"
            _assert_valid_call({**answer, "content": None}, tuple(PARAMETERS))
        else:
            assert isinstance(answer["content"], str) and answer["finish_reason"] in ("stop", "length")


def test_tools_are_rendered_by_a_template_that_supports_them(oa, llama_server):
    """Auto and none give the template the tools; the tiny Llama's template ignores them, so the answer is the
    same as without tools."""
    model = llama_server.settings.model_name()
    base = oa.chat.completions.create(model=model, messages=ASK, max_tokens=10, temperature=0)
    with_tools = oa.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=10, temperature=0)
    assert with_tools.choices[0].message.content == base.choices[0].message.content
    assert with_tools.usage.prompt_tokens == base.usage.prompt_tokens


def test_a_conversation_with_a_call_and_its_result_is_answered(oa, llama_server):
    model = llama_server.settings.model_name()
    first = oa.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    done = oa.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=10, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with llama_server.client() as c:  # the tool's result is in what the model reads
        r = c.post("/tokenize", json={"model": model, "messages": messages})
        assert r.status_code == 200, r.text
        assert done.usage.prompt_tokens == r.json()["count"]
    assert "18 degrees and sunny" in llama_server.tokenizer.decode(r.json()["tokens"])


def test_tool_refusals_name_the_field(oa, llama_server):
    model = llama_server.settings.model_name()
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": 7}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}},
         "tool_choice.function.name"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}], "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "18"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[0].tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(**{"model": model, "messages": ASK, "max_tokens": 5, **body})
        assert err.value.body["param"] == param, (body, err.value.body)
    with llama_server.client() as c:  # a lone surrogate (JSON's escape: the openai client cannot send one)
        schema = {"type": "object", "properties": {"\ud800": {"type": "string"}}}
        body = {"model": model, "messages": ASK,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
        r = c.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == 'tools[0].function.parameters.properties["\\ud800"]'
    # a named function's parameters that do not compile are named exactly
    bad = [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model=model, messages=ASK, tools=bad, max_tokens=5,
                                   tool_choice={"type": "function", "function": {"name": "g"}})
    assert err.value.body["param"] == "tools[1].function.parameters"
