"""The README's tool call on the real demo (SmolLM2-135M-Instruct, greedy): a named function and "required" give a
call whose arguments validate and name the city asked about; the call and its result, sent back, are answered."""

from __future__ import annotations

import json

import jsonschema
import openai

from server.demo.smollm2 import SERVED_NAME

# As in the README's "Tools" paragraph.
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}}]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_the_demo_calls_the_readmes_function(start_server, smollm2_cache):
    server = start_server(model=None, cache_dir=smollm2_cache, prompt_dir=None)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
            reply = client.chat.completions.create(model=SERVED_NAME, messages=QUESTION, tools=TOOLS,
                                                   tool_choice=choice, max_tokens=60, temperature=0)
            answer = reply.choices[0]
            assert answer.finish_reason == "tool_calls" and answer.message.content is None
            [call] = answer.message.tool_calls
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, WEATHER)
            assert call.function.name == "get_weather" and arguments["city"] == "Paris", arguments
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}
        done = client.chat.completions.create(model=SERVED_NAME, messages=[
            *QUESTION, answer.message.model_dump(exclude_none=True), result], tools=TOOLS, max_tokens=30,
            temperature=0)
        assert done.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        server.stop()
