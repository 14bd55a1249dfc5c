"""Tool calls on /v1/chat/completions: OpenAI's `tools` and `tool_choice`, checked, turned into what the engine
does, and the model's output turned back into OpenAI's `tool_calls`.

- `"required"` and a named function are constrained: the answer is JSON valid for
  `{"name": <a given function's name>, "arguments": <its parameters schema>}` (anyOf over the functions for
  "required"), compiled, probed and masked like any response_format, so the call always parses and its
  arguments always validate. It comes back as one call.
- `"auto"` (the default when tools are given) renders the tools with the chat template and lets the model
  write what it will; its text is then parsed (`parse_auto`): the template's own markers (Hermes/Qwen
  `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS]`, Llama's `<|python_tag|>`) or a bare JSON call object
  (or a list of them) naming a given function become calls; anything else is text.
- `"none"` renders the tools and never calls: the text is the answer.

Streamed, the text of an answer that may be a call is held back until it is known not to be one
(`ToolStream`); a call is sent whole, as one delta, when the answer ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from server.api.schemas import MAX_TOOLS, ChatMessage, ChatTool, check_json_text
from server.engine.errors import InvalidParameter
from server.engine.grammar import ResponseFormat

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
Mode = Literal["none", "auto", "forced"]

# Where a call starts in a model's text, as chat templates that support tools teach it.
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MARKERS = (HERMES_OPEN, "[TOOL_CALLS]", "<|python_tag|>")
# What a bare call's text starts with (after white space): a JSON object or list, or a Markdown code fence.
OPENERS = ("{", "[", "```")


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI gives it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        """OpenAI's shape: a message's tool call, or with `index` a streamed delta's."""
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools ask of the engine and of its answer."""

    mode: Mode
    functions: dict[str, dict]  # name -> its parameters schema, in the order given
    rendered: tuple[dict, ...]  # the tools as the chat template gets them
    forced: tuple[str, ...] = ()  # mode "forced": the functions a call may name
    param: str = "tools"  # what an error of the constrained format names
    parallel: bool = True  # parallel_tool_calls: false keeps a free answer's first call only

    def response_format(self) -> ResponseFormat | None:
        """The grammar of a constrained answer (None unless forced)."""
        if self.mode != "forced":
            return None
        shapes = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": name}, "arguments": self.functions[name]}}
                  for name in self.forced]
        schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
        try:
            return ResponseFormat.json_schema(schema)
        except InvalidParameter as exc:  # too long a schema, say: the tools' fault
            raise InvalidParameter(self.param, exc.expected, exc.actual) from None

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer's text: no calls and the text as it is, unless it is a call."""
        if self.mode == "forced":
            calls = parse_forced(text, self.forced)
            return (None, calls) if calls else (text, [])
        if self.mode == "auto":
            content, calls = parse_auto(text, self.functions)
            return content, calls if self.parallel else calls[:1]
        return text, []


def plan(tools: list[ChatTool] | None, tool_choice: Any, raw_tools: Any, parallel: bool = True) -> ToolPlan | None:
    """The request's ToolPlan (None: no tools, no choice); every mistake is an InvalidParameter naming its field.
    `raw_tools`: the body's `tools` as sent (its free JSON is checked for text UTF-8 can encode)."""
    if raw_tools is not None:
        check_json_text(raw_tools, "tools")
    if tool_choice is not None:
        check_json_text(tool_choice, "tool_choice")
    if not tools:
        if tools is not None:
            raise InvalidParameter("tools", f"a list of 1..{MAX_TOOLS} tools, or absent", "an empty list")
        if tool_choice not in (None, "none"):
            raise InvalidParameter("tool_choice", 'absent or "none" without tools (there is nothing to call)',
                                   tool_choice)
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidParameter("tools", f"at most {MAX_TOOLS} tools", len(tools))
    functions: dict[str, dict] = {}
    rendered = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if not NAME.fullmatch(fn.name):
            raise InvalidParameter(f"tools[{i}].function.name", "1-64 letters, digits, underscores or dashes",
                                   fn.name)
        if fn.name in functions:
            raise InvalidParameter(f"tools[{i}].function.name", "a name no other tool has", fn.name)
        functions[fn.name] = _parameters(fn.parameters, f"tools[{i}].function.parameters")
        spec: dict[str, Any] = {"name": fn.name}
        if fn.description is not None:
            spec["description"] = fn.description
        spec["parameters"] = functions[fn.name]
        rendered.append({"type": "function", "function": spec})
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan("auto", functions, tuple(rendered), parallel=parallel)
    if tool_choice == "none":
        return ToolPlan("none", functions, tuple(rendered))
    if tool_choice == "required":
        return ToolPlan("forced", functions, tuple(rendered), forced=tuple(functions))
    if isinstance(tool_choice, dict):
        named = tool_choice.get("function")
        if tool_choice.get("type") != "function":
            raise InvalidParameter("tool_choice.type", '"function"', tool_choice.get("type"))
        if not isinstance(named, dict) or not isinstance(named.get("name"), str):
            raise InvalidParameter("tool_choice.function", 'an object {"name": ...} naming one of the tools', named)
        name = named["name"]
        if name not in functions:
            raise InvalidParameter("tool_choice.function.name", f"the name of one of the tools "
                                   f"({', '.join(functions)})", name)
        return ToolPlan("forced", functions, tuple(rendered), forced=(name,),
                        param=f"tools[{list(functions).index(name)}].function.parameters")
    raise InvalidParameter("tool_choice", '"none", "auto", "required" or {"type": "function", "function": '
                           '{"name": ...}}', tool_choice)


def _parameters(schema: dict[str, Any] | None, param: str) -> dict:
    """A function's parameters: an object schema (absent: an object with no properties)."""
    if schema is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    kind = schema.get("type", "object")
    if kind != "object":
        raise InvalidParameter(param, 'a JSON schema of an object ("type": "object")', kind)
    return {"type": "object", **schema}


def messages_extras(messages: list[ChatMessage]) -> tuple[dict, ...]:
    """Per message, the keys the chat template gets beside role and content: an assistant's tool_calls (their
    arguments as objects, as templates expect them), a tool result's tool_call_id, a name. Empty when no
    message has any. A tool message without tool_call_id, or tool_calls on another role, is refused."""
    extras: list[dict] = []
    for i, m in enumerate(messages):
        extra: dict[str, Any] = {}
        if m.name is not None and m.role == "tool":  # the function's name, where a template shows it
            extra["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidParameter(f"messages[{i}].tool_calls", "on an assistant message only", m.role)
            calls = []
            for k, call in enumerate(m.tool_calls):
                arguments: Any = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        raise InvalidParameter(f"messages[{i}].tool_calls[{k}].function.arguments", "JSON text",
                                               arguments) from None
                check_json_text(arguments, f"messages[{i}].tool_calls[{k}].function.arguments")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            extra["tool_calls"] = calls
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidParameter(f"messages[{i}].tool_call_id", 'the id of the call a "tool" message answers',
                                       None)
            extra["tool_call_id"] = m.tool_call_id
        extras.append(extra)
    return tuple(extras) if any(extras) else ()


# -- the model's text -> calls ------------------------------------------------------------------------------


def parse_forced(text: str, names: tuple[str, ...]) -> list[ToolCall]:
    """A constrained answer's call: [] unless it is complete (an answer cut by max_tokens is not)."""
    call = _call(_json(text), names)
    return [call] if call is not None else []


def parse_auto(text: str, functions: dict[str, Any]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a free answer: calls where the text is the template's markers or a bare JSON call of a
    given function, the text before a marker as content (None when blank); otherwise (text, [])."""
    names = tuple(functions)
    start = text.find(HERMES_OPEN)
    if start >= 0:
        bodies = re.findall(rf"{re.escape(HERMES_OPEN)}(.*?)(?:{re.escape(HERMES_CLOSE)}|$)", text[start:], re.S)
        calls = [_call(_json(body), names) for body in bodies]
        if calls and all(c is not None for c in calls):
            return text[:start].strip() or None, [c for c in calls if c is not None]
        return text, []
    stripped = text.strip()
    for marker in MARKERS[1:]:
        if stripped.startswith(marker):
            stripped = stripped[len(marker):].strip()
            break
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) > 6:
        stripped = stripped[3:-3].strip()
        stripped = stripped[4:] if stripped.startswith("json") else stripped
    value = _json(stripped)
    if value is None and ";" in stripped:  # Llama 3's several calls: objects separated by semicolons
        parts = [_json(part) for part in stripped.split(";")]
        value = parts if all(p is not None for p in parts) else None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if items and all(c is not None for c in calls):
        return None, [c for c in calls if c is not None]
    return text, []


_DECODER = json.JSONDecoder()


def _json(text: str) -> Any:
    """The JSON value `text` is (white space around it allowed), or None."""
    text = text.strip()
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return value if end == len(text) else None


def _call(value: Any, names: tuple[str, ...]) -> ToolCall | None:
    """A call of one of `names` from a JSON value: {"name", "arguments" (or "parameters"): an object or its JSON
    text}, or OpenAI's own {"type": "function", "function": {...}}."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and "name" not in value:
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _json(arguments)
    if not isinstance(name, str) or name not in names or not isinstance(arguments, dict):
        return None
    if set(value) - {"name", "arguments", "parameters", "type", "id"}:
        return None  # an answer in JSON that happens to have a "name", not a call
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


# -- streaming ------------------------------------------------------------------------------------------------


class ToolStream:
    """One choice's streamed text with tools: `feed` each piece and send what it returns as content; `finish`
    at the end gives (the content held back, the calls). A forced answer is all held back; a free one is held
    back while it could still be a call (it starts like one, or a marker has begun), and sent as it comes once
    it cannot."""

    def __init__(self, tools: ToolPlan) -> None:
        self.tools = tools
        self.text = ""  # everything so far
        self.sent = 0  # characters of `text` sent as content
        self.plain = tools.mode == "none"  # known to be text: sent as it comes (markers still watched, for auto)

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.tools.mode == "none":
            return self._send(len(self.text))
        if self.tools.mode == "forced":
            return ""
        if not self.plain:
            head = self.text.lstrip()
            if not head or any(o.startswith(head) or head.startswith(o) for o in OPENERS + MARKERS):
                return ""  # it may be a call: wait
            self.plain = True
        marker = self.text.find(HERMES_OPEN, self.sent)
        if marker >= 0:
            return self._send(marker)  # a call begins: the text before it only
        return self._send(len(self.text) - _partial_suffix(self.text, HERMES_OPEN))

    def finish(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls), `text` the answer's whole text."""
        self.text = text
        _, calls = self.tools.calls(text)
        if not calls:
            return text[self.sent:], []
        cut = text.find(HERMES_OPEN)  # the text before a marker is content; a bare call has none
        rest = text[self.sent:cut] if cut > self.sent else ""
        return (rest if text[:cut].strip() else ""), calls

    def _send(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that begins `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
