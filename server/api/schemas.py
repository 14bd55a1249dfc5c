"""HTTP request and response shapes. Types are checked here; ranges by SamplingParams (one place)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from server.api import logprobs as logprob_format
from server.api.errors import ErrorContext, ErrorInContext
from server.config import Settings
from server.engine.admission import check_encodable
from server.engine.errors import InvalidParameter
from server.engine.grammar import ResponseFormat
from server.engine.results import ChoiceScores, Completion, Usage
from server.engine.samples import SampleGroup
from server.engine.sequence import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_SAMPLES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MIN_REPETITION_PENALTY,
    SamplingParams,
)


class _Strict(BaseModel):
    # A misspelt field (max_tokens on /generate) is an error, not a silently ignored default; a value of
    # another JSON type ("5" for 5, 0 for false) is an error, not quietly converted.
    model_config = ConfigDict(extra="forbid", strict=True)


_Text = Annotated[str, Field(min_length=1)]  # "" gives no token to start from
# Caps written in the document; the engine (stop strings) and the routes (--max-batch-requests) enforce them.
_STOP_HELP = f"A stop string or a list of at most {MAX_STOP_STRINGS}, each of 1..{MAX_STOP_CHARS} characters."
_LIST_HELP = f"at most --max-batch-requests entries ({Settings.model_fields['max_batch_requests'].default} by default)"

# n's range is checked by the engine (admission), as SamplingParams checks the others.
_N_HELP = (f"Samples of each text, 1..{MAX_SAMPLES}: the text is computed once and shared; with a seed, sample i "
           "draws from seed + i; greedy samples are all the same.")
_RAW_HELP = ("Send the text as it is: without the task's text template (a task trained with `promptswap train "
             "--template` has one; GET /prompts/{task} shows it).")
# promptswap's own API takes the engine's defaults as they are: written once, in SamplingParams.
_ENGINE = SamplingParams()
_REPETITION_HELP = (f"[{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]; 1: none. transformers' repetition "
                    "penalty over the text's and the generated tokens: a "
                    "seen token's positive logit is divided by it, a negative one multiplied.")
_PRESENCE_HELP = "[-2, 2]; 0: none. Lowers the logit of every token generated so far by this much (OpenAI's)."
_FREQUENCY_HELP = "[-2, 2]; 0: none. Lowers each generated token's logit by this much per time it came (OpenAI's)."


# body field -> the SamplingParams field it sets, where the names differ (OpenAI's)
_ENGINE_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                 "top_logprobs": "logprobs"}


def check_json_text(value: Any, param: str) -> None:
    """Every string in a JSON value, object keys included, at any depth, is text UTF-8 can encode: the rule every
    other text field is held to (check_encodable), with its InvalidParameter (a 422; the route's error context
    applies) naming where the string is: `response_format.json_schema.schema.properties.name.pattern`,
    `...properties["\\ud800"]` for a key. For any field that carries free JSON (response_format; tools)."""
    stack: list[tuple[Any, str]] = [(value, param)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_encodable(item, path)
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                # JSON's own spelling for a key that is no plain name (it escapes a lone surrogate: ASCII)
                key_path = f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"
                check_encodable(key, key_path)
                children.append((child, key_path))
            stack.extend(reversed(children))  # the first string in the document is the one named
        elif isinstance(item, list):
            stack.extend(reversed([(child, f"{path}[{i}]") for i, child in enumerate(item)]))


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str | None = Field(None, description="The schema's name (OpenAI requires one; promptswap does not read it)")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema every answer is valid for")
    strict: bool | None = Field(None, description="Accepted for OpenAI's clients: answers always follow the schema")
    description: str | None = None


class ResponseFormatBody(BaseModel):
    """Structured output: the generated text is a JSON object, JSON valid for a schema, or (on /generate only) a
    match of a regular expression. Tokens are masked with llguidance as they are picked; the answer stops when
    the format is complete (finish_reason "stop")."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JsonSchemaFormat | None = Field(None, description='With type "json_schema"')
    pattern: str | None = Field(None, description='With type "regex" (/generate only): the whole output matches it')

    def to_engine(self, regex_allowed: bool) -> ResponseFormat | None:
        """The engine's ResponseFormat (None for plain text); what does not fit its type is a 422 naming it."""
        check_json_text(self.model_dump(by_alias=True, exclude_none=True), "response_format")
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat("json_object")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidParameter("response_format.json_schema", 'an object {"name", "schema"} with type '
                                       '"json_schema"', None)
            return ResponseFormat.json_schema(self.json_schema.schema_)
        if not regex_allowed:
            raise InvalidParameter("response_format.type", '"text", "json_object" or "json_schema" ("regex" is '
                                   "/generate's)", self.type)
        if not self.pattern:
            raise InvalidParameter("response_format.pattern", 'a regular expression with type "regex"', self.pattern)
        return ResponseFormat("regex", self.pattern)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (an extra body field): exactly one of json, regex, choice or grammar."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (an object, or its "
                                                                                "JSON text)")
    regex: str | None = Field(None, description="A regular expression the whole output matches")
    choice: list[str] | None = Field(None, description="The output is exactly one of these strings")
    grammar: str | None = Field(None, description="A grammar the output follows: Lark, or GBNF/EBNF (`::=` rules)")
    structural_tag: Any = Field(None, description="Not supported: refused")

    def to_engine(self) -> tuple[str, ResponseFormat]:
        """(the field's name for errors, the engine's ResponseFormat)."""
        given = [name for name in ("json", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, "json_" if name == "json" else name) is not None]
        if len(given) != 1:
            raise InvalidParameter("structured_outputs", "exactly one of json, regex, choice or grammar",
                                   given or "none")
        [name] = given
        param = f"structured_outputs.{name}"
        check_json_text(self.model_dump(by_alias=True, exclude_none=True), "structured_outputs")
        try:
            if name == "structural_tag":
                raise InvalidParameter(param, "absent (structural tags are not supported; use json, regex, choice "
                                       "or grammar)", "a structural tag")
            if name == "json":
                schema = self.json_
                if isinstance(schema, str):
                    try:
                        schema = json.loads(schema)
                    except ValueError as exc:
                        raise InvalidParameter(param, "a JSON schema (an object, or its JSON text)",
                                               str(exc)) from None
                return param, ResponseFormat.json_schema(schema)
            if name == "choice":
                return param, ResponseFormat.choice(self.choice)
            return param, ResponseFormat(name, getattr(self, name))  # type: ignore[arg-type]  # regex or grammar
        except InvalidParameter as exc:
            raise ErrorInContext(exc, ErrorContext(rename={"response_format": param})) from exc


class StrictResponseFormatBody(ResponseFormatBody):
    """/generate's response_format: like the rest of promptswap's own bodies, a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling:
    """The body fields that go to SamplingParams as they are (each route caps max_new_tokens / max_tokens)."""

    REGEX_ALLOWED: ClassVar[bool] = True  # a "regex" response format: promptswap's own API takes it, OpenAI's do not

    def engine_format(self) -> ResponseFormat | None:
        """The body's response_format as the engine's (None: plain text)."""
        body: ResponseFormatBody | None = getattr(self, "response_format", None)
        return body.to_engine(self.REGEX_ALLOWED) if body is not None else None

    def sent(self) -> frozenset[str]:
        """The SamplingParams fields this body set itself (a schema default or an explicit null is not sent)."""
        fields: set[str] = getattr(self, "model_fields_set", set())
        names = {_ENGINE_NAMES.get(f, f) for f in fields if getattr(self, f, None) is not None}
        return frozenset(names & set(SamplingParams.__dataclass_fields__))

    def sampling_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name)
                for name in ("temperature", "top_k", "top_p", "seed", "stop", "ignore_eos", "logprobs",
                             "repetition_penalty", "presence_penalty", "frequency_penalty")}


class GenerateParams(_Sampling, _Strict):
    task: str | None = Field(None, description="Task name; null or absent: the base model alone.")
    text: _Text = Field(description="Input text, tokenized exactly as tokenizer(text) does.")
    max_new_tokens: int | None = Field(
        None, description=f"Default {DEFAULT_MAX_NEW_TOKENS}, at most the server's cap."
    )
    temperature: float = _ENGINE.temperature
    top_k: int = _ENGINE.top_k
    top_p: float = _ENGINE.top_p
    seed: int | None = _ENGINE.seed
    stop: str | list[str] | None = Field(None, description=_STOP_HELP)
    ignore_eos: bool = _ENGINE.ignore_eos
    repetition_penalty: float = Field(_ENGINE.repetition_penalty, description=_REPETITION_HELP)
    presence_penalty: float = Field(_ENGINE.presence_penalty, description=_PRESENCE_HELP)
    frequency_penalty: float = Field(_ENGINE.frequency_penalty, description=_FREQUENCY_HELP)
    raw: bool = Field(False, description=_RAW_HELP)
    logprobs: int | None = Field(
        None, description=f"0..{MAX_LOGPROBS}: report each generated token's log-probability (from the raw "
        "distribution, before temperature, top_k and top_p) and this many most likely alternatives.")
    choices: list[str] | bool | None = Field(
        None, description=f"Score these answers (1..{MAX_CHOICES} strings; true: the task's stored choices) instead of "
        "generating: the answer is then {task, best, choices: [{text, logprob, mean_logprob, num_tokens}], usage}, "
        "most likely first. A choice's tokens are tokenizer(choice, add_special_tokens=False) after the text's. "
        "Not with stream.")
    response_format: StrictResponseFormatBody | None = Field(
        None, description='Structured output: {"type": "json_object"}, {"type": "json_schema", "json_schema": '
        '{"name", "schema"}} or {"type": "regex", "pattern": ...}. Not with choices.')
    n: int = Field(1, description=_N_HELP + " Not with choices. With n > 1 the answer is {task, outputs: [{index, "
                   "text, token_ids, finish_reason, logprobs}], usage} (SamplesResponse); streamed, every event "
                   "carries its sample's index.")


class GenerateRequest(GenerateParams):
    stream: bool = False


class BatchRequest(_Strict):
    requests: list[GenerateParams] = Field(min_length=1, description=f"The requests, {_LIST_HELP}.")


class UsageOut(BaseModel):
    prompt_tokens: int
    virtual_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="Of prompt_tokens, those read from the prefix cache (computed by an "
                                              "earlier request) instead of computed")

    @classmethod
    def of(cls, usage: Usage) -> UsageOut:
        return cls(prompt_tokens=usage.prompt_tokens, virtual_tokens=usage.virtual_tokens,
                   completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens)


class AlternativeOut(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprobOut(AlternativeOut):
    top: list[AlternativeOut]


class _LogprobsWhenAsked(BaseModel):
    """An answer whose `logprobs` (each subclass's last field, so the keys keep their order) is absent unless asked."""

    @model_serializer(mode="wrap")
    def _logprobs_only_when_asked(self, handler: Any) -> dict:
        data = handler(self)
        if data.get("logprobs") is None:
            data.pop("logprobs", None)  # absent, not null, unless the request asked for them
        return data


class GenerateResponse(_LogprobsWhenAsked):
    task: str | None
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    usage: UsageOut
    logprobs: list[TokenLogprobOut] | None = Field(None, description="With `logprobs`: one per generated token")

    @classmethod
    def of(cls, c: Completion, tokenizer: Any = None) -> GenerateResponse:
        return cls(
            task=c.task, text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
            usage=UsageOut.of(c.usage),
            logprobs=[TokenLogprobOut(**e) for e in logprob_format.native(c.logprobs, tokenizer)]
            if c.logprobs is not None else None,
        )


class ChoiceOut(BaseModel):
    text: str
    logprob: float = Field(description="log P(the choice's tokens | task, text): the sum over its tokens")
    mean_logprob: float = Field(description="logprob / num_tokens")
    num_tokens: int


class ChoicesResponse(BaseModel):
    """A request with `choices`: every choice scored, most likely first (`best` is the first's text)."""

    task: str | None
    best: str
    choices: list[ChoiceOut]
    usage: UsageOut = Field(description="completion_tokens: the choices' tokens scored")

    @classmethod
    def of(cls, s: ChoiceScores) -> ChoicesResponse:
        return cls(
            task=s.task, best=s.best,
            choices=[ChoiceOut(text=c.text, logprob=c.logprob, mean_logprob=c.mean_logprob, num_tokens=c.num_tokens)
                     for c in s.choices],
            usage=UsageOut.of(s.usage),
        )


class SampleOut(_LogprobsWhenAsked):
    index: int = Field(description="The sample's number, 0..n-1")
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    logprobs: list[TokenLogprobOut] | None = Field(None, description="With `logprobs`: one per generated token")


class SamplesResponse(BaseModel):
    """A request with n > 1: every sample of the text, in order."""

    task: str | None
    outputs: list[SampleOut]
    usage: UsageOut = Field(description="prompt_tokens and virtual_tokens: the text's, once; completion_tokens: all "
                                        "the samples' together")

    @classmethod
    def of(cls, completions: list[Completion], tokenizer: Any) -> SamplesResponse:
        first = completions[0]
        outputs = []
        for i, c in enumerate(completions):
            one = GenerateResponse.of(c, tokenizer)
            outputs.append(SampleOut(index=i, text=one.text, token_ids=one.token_ids, finish_reason=one.finish_reason,
                                     logprobs=one.logprobs))
        usage = SampleGroup.usage([c.usage for c in completions])
        return cls(task=first.task, outputs=outputs, usage=UsageOut.of(usage))


def response_of(results: list[Completion | ChoiceScores],
                tokenizer: Any) -> GenerateResponse | ChoicesResponse | SamplesResponse:
    """The answer to one /generate request: its one result, or its samples' (n > 1)."""
    if len(results) > 1:
        return SamplesResponse.of([r for r in results if isinstance(r, Completion)], tokenizer)
    [result] = results
    return ChoicesResponse.of(result) if isinstance(result, ChoiceScores) else GenerateResponse.of(result, tokenizer)


class BatchResponse(BaseModel):
    results: list[GenerateResponse | ChoicesResponse | SamplesResponse] = Field(
        description="One per request, in order (SamplesResponse for a request with n > 1)")


class PromptList(BaseModel):
    prompts: list[dict]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBody(_Sampling, BaseModel):
    """What OpenAI's completions and chat bodies share, with OpenAI's defaults (written here only). Unknown
    fields are ignored, as OpenAI clients send extras; an explicit null means the default, as it does for
    OpenAI; values must have their JSON type, as OpenAI requires."""

    model_config = ConfigDict(extra="ignore", strict=True)
    REGEX_ALLOWED: ClassVar[bool] = False

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, description=_N_HELP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=_STOP_HELP)
    seed: int | None = None
    presence_penalty: float = Field(0.0, description=_PRESENCE_HELP)
    frequency_penalty: float = Field(0.0, description=_FREQUENCY_HELP)
    logit_bias: dict[str, float] | None = Field(
        None, description="OpenAI's: token id (as a string) -> a bias in [-100, 100] added to its logit, at most "
                          f"{MAX_LOGIT_BIAS} tokens")
    user: str | None = None
    response_format: ResponseFormatBody | None = Field(
        None, description='Structured output: {"type": "text"} (the default), {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}')
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's structured output (an extra body field): one of json (a schema), regex, choice (a "
                          "list of strings) or grammar (Lark or GBNF); not with response_format")
    # Extensions, as vLLM names them.
    top_k: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = Field(1.0, description=_REPETITION_HELP)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def unsupported(self) -> list[tuple[str, bool, str, object]]:
        """(field, holds, what it must be, what was sent) for what neither endpoint honours."""
        return [
            ("structured_outputs", self.structured_outputs is None or self.response_format is None
             or self.response_format.type == "text", "absent with a response_format", "both"),
        ]

    def format_param(self) -> str:
        """The field a format's error names: response_format, or the structured_outputs key used."""
        if self.structured_outputs is None:
            return "response_format"
        return self.structured_outputs.to_engine()[0]

    def engine_format(self) -> ResponseFormat | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.to_engine()[1]
        return super().engine_format()

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise InvalidParameter("logit_bias", "token ids (as strings of digits) as keys", key)
            bias.append((int(key), value))
        kwargs["logit_bias"] = tuple(sorted(bias))
        return kwargs


class CompletionRequest(_OpenAIBody):
    """OpenAI's /v1/completions body."""

    # Text only: token-id prompts (OpenAI's list[int] forms) are not accepted.
    prompt: _Text | list[_Text] = Field(min_length=1, description=f"A text, or a list of texts ({_LIST_HELP}).")
    max_tokens: int = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    raw: bool = Field(False, description=_RAW_HELP)  # promptswap's own


class ErrorDetail(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "precondition_error, overloaded_error, storage_error, starting_error (503 while "
                                  "the model loads) or server_error")
    message: str = Field(description="What was wrong, with the expected and the actual value")
    param: str | None = Field(description="The request field at fault (text, requests[2].text, task, ...), if any")
    current_version: int | None = Field(None, description="412 only: the task's version now (its ETag unquoted); "
                                                          "null when the task does not exist")
    code: str | None = Field(None, description="/v1/* only, OpenAI's: model_not_found for an unknown model, else "
                                               "null")


class ErrorResponse(BaseModel):
    """Every error answer, whatever the status."""

    error: ErrorDetail


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="unavailable (503) until every stored task is loaded")
    reason: str | None = Field(None, description="Why not ready")
    prompts: int | None = Field(None, description="How many tasks are served")


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = Field(description="unavailable while starting or draining (503)")
    reason: str | None = Field(None, description="Why unavailable: starting (the model and the prompts are loading), "
                                                 "draining (shutting down) or failed (the model did not load)")
    model: str | None = Field(None, description="The base model's served name")
    prompts: int | None = Field(None, description="How many tasks are served")
    demo: bool | None = Field(None, description="Whether this is the offline demo")


MAX_MESSAGES = 256  # messages in one chat request (the body's byte limit applies too)
_ROLES = Literal["system", "developer", "user", "assistant", "tool"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str | dict[str, Any] = Field(description="The call's arguments: their JSON text (OpenAI's), or an "
                                                          "object")


class ToolCallIn(BaseModel):
    """A call an earlier assistant message made, as an answer's `tool_calls` gave it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: _ROLES
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="An assistant message's calls (as an answer gave "
                                                                  "them)")
    tool_call_id: str | None = Field(None, description='With role "tool": the id of the call this is the result of')

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


MAX_TOOLS = 128  # OpenAI's limit


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(description="1-64 letters, digits, underscores or dashes; unique among the tools")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of an object (absent: no "
                                                                "parameters): a call's arguments are valid for it")
    strict: bool | None = Field(None, description="Accepted: constrained calls always follow the schema")


class ChatTool(BaseModel):
    """OpenAI's tool: a function the model may call."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionDefinition


class ChatRequest(_OpenAIBody):
    """OpenAI's /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES,
                                        description=f"The conversation, 1..{MAX_MESSAGES} messages.")
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description=f"0..{MAX_LOGPROBS} alternatives per token, with logprobs")
    tools: list[ChatTool] | None = Field(None, description=f"Functions the model may call, at most {MAX_TOOLS}: "
                                         "the chat template renders them (where it supports tools)")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none" (tools rendered, never called), "auto" (the default with tools: the model '
        'chooses; its text is parsed for a call), "required" (the answer is a call of one of the tools, by '
        'grammar) or {"type": "function", "function": {"name": ...}} (a call of that one)')
    parallel_tool_calls: bool | None = Field(None, description="false: an answer has one call at most (a "
                                                               "constrained answer always has one)")
    functions: list[Any] | None = None  # OpenAI's older name for tools

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        # OpenAI's chat shape: a switch, and the number of alternatives apart.
        kwargs["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return kwargs


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages, as the model would read them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="A task name, or the base model's served name / null for none")
    prompt: str | None = Field(None, description="A text (the task's template frames it unless raw)")
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES,
                                               description="Or a conversation, through the chat template")
    add_special_tokens: bool | None = Field(None, description="Default: true for a prompt, false for messages "
                                                              "(the chat template writes its own)")
    add_generation_prompt: bool = Field(True, description="With messages: end with the assistant's turn")
    return_token_strs: bool = Field(False, description="Also each token's text")
    raw: bool = Field(False, description=_RAW_HELP)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParameter("prompt", "a prompt or messages, one of them", "both" if self.prompt else "neither")
        return self


class TokenizeResponse(BaseModel):
    count: int = Field(description="The text's tokens (the task's virtual tokens not counted)")
    max_model_len: int = Field(description="Positions a request may use, virtual tokens included")
    tokens: list[int]
    token_strs: list[str] | None = None
    virtual_tokens: int = Field(description="The task's virtual tokens, read before the text (0: no task)")
    templated: str | None = Field(None, description="The text as the task's template framed it (null: no template)")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="A task name, or the base model's served name / null for none: "
                                                "checked as /tokenize checks it (the text is the same either way)")
    tokens: list[int] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str
