"""What a vLLM user sends in `extra_body` through the openai client: `structured_outputs` (json, regex, choice,
grammar) on completions and chat, and OpenAI's `logit_bias`; refusals are OpenAI's 400 naming the key."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "stars"],
          "properties": {"city": {"type": "string", "maxLength": 12}, "stars": {"type": "integer", "minimum": 1,
                                                                                "maximum": 5}}}
MESSAGES = [{"role": "user", "content": "Rate the city"}]


def ask(oa, llama_server, chat: bool, extra: dict, **kw) -> str:
    model = llama_server.settings.model_name()
    if chat:
        done = oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, extra_body=extra, **kw)
        return done.choices[0].message.content
    done = oa.completions.create(model=model, prompt="Rate the city:", max_tokens=60, extra_body=extra, **kw)
    return done.choices[0].text


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_structured_outputs_json_regex_choice_and_grammar(oa, llama_server, chat, temperature):
    kw = {"temperature": temperature, "seed": 4}
    jsonschema.validate(json.loads(ask(oa, llama_server, chat, {"structured_outputs": {"json": SCHEMA}}, **kw)),
                        SCHEMA)
    as_text = ask(oa, llama_server, chat, {"structured_outputs": {"json": json.dumps(SCHEMA)}}, **kw)
    jsonschema.validate(json.loads(as_text), SCHEMA)
    assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", ask(oa, llama_server, chat,
                                                    {"structured_outputs": {"regex": r"[0-9]{2}-[a-z]{3}"}}, **kw))
    choices = ["positive", "negative", "it's \"mixed\""]
    assert ask(oa, llama_server, chat, {"structured_outputs": {"choice": choices}}, **kw) in choices
    lark = 'start: "stars: " DIGIT " of 5"\nDIGIT: /[1-5]/'
    assert re.fullmatch(r"stars: [1-5] of 5", ask(oa, llama_server, chat, {"structured_outputs": {"grammar": lark}},
                                                   **kw))
    gbnf = 'root ::= "yes" | "no" | "maybe " digit\ndigit ::= [0-9]'
    assert re.fullmatch(r"yes|no|maybe [0-9]", ask(oa, llama_server, chat, {"structured_outputs": {"grammar": gbnf}},
                                                    **kw))


@pytest.mark.parametrize(("extra", "param"), [
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": {"type": "x"}}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a+"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"logit_bias": {"12": 101}}, "logit_bias.12"),
    ({"logit_bias": {"twelve": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
])
def test_refusals_are_openais_400_naming_the_key(oa, llama_server, extra, param):
    for chat in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(oa, llama_server, chat, extra)
        assert caught.value.body["param"] == param, caught.value.body


def test_logit_bias_bans_a_token_and_leaves_the_rest_alone(oa, llama_server):
    model = llama_server.settings.model_name()
    plain = oa.completions.create(model=model, prompt="Rate the city:", max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    first = llama_server.tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banned = oa.completions.create(model=model, prompt="Rate the city:", max_tokens=6, temperature=0,
                                   logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert llama_server.tokenizer(banned.choices[0].text, add_special_tokens=False)["input_ids"][0] != first
    again = oa.completions.create(model=model, prompt="Rate the city:", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert again.choices[0].text == plain.choices[0].text
