"""Admission reads a task's snapshot once per request: its weights, text template, defaults and, for a chat,
its system message all come from that one version, even while the task changes under it."""

from __future__ import annotations

import pytest

from server.engine.admission import EngineRequest
from server.engine.chat import Conversation
from server.engine.sequence import SamplingParams

CHAT = Conversation((("user", "Which way is the station?"),))


class ChangingTasks:
    """The registry, but every read after the first returns the task's next version (a new system message and
    new defaults): a request that read twice would mix two versions."""

    def __init__(self, registry, task: str) -> None:
        self.registry, self.task, self.reads = registry, task, 0

    def get(self, task: str):
        snapshot = self.registry.get(task)
        self.reads += 1
        self.registry.patch(self.task, {"system": f"version {self.reads + 1} speaks",
                                        "defaults": {"max_new_tokens": 2 + self.reads}})
        return snapshot


@pytest.mark.parametrize("task", ["pt8", "prefix16"])
def test_a_chat_takes_its_system_message_and_weights_from_one_snapshot(make_engine, base_model, registry, task,
                                                                      monkeypatch):
    if not base_model.tokenizer.chat_template:
        pytest.skip("this tiny model has no chat template (GPT-2 chats through none)")
    registry.patch(task, {"system": "version 1 speaks", "defaults": {"max_new_tokens": 2}})
    engine = make_engine()
    tasks = ChangingTasks(registry, task)
    monkeypatch.setattr(engine.admission, "tasks", tasks)
    handle = engine.submit(EngineRequest(task=task, conversation=CHAT, params=SamplingParams(ignore_eos=True),
                                         sent=frozenset({"ignore_eos"})))
    done = handle.result(timeout=60)
    assert tasks.reads == 1
    assert handle.version == registry.get(task).version - 1  # the version read, not the one after it
    seq = handle._seq
    expected = CHAT.with_system("version 1 speaks").render(engine.tokenizer)
    assert seq.prompt_ids == list(engine.tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert len(done.token_ids) == 2  # that version's default, not the next one's


def test_a_conversation_that_brings_its_own_system_message_keeps_it(make_engine, base_model, registry):
    if not base_model.tokenizer.chat_template:
        pytest.skip("this tiny model has no chat template")
    engine = make_engine()
    registry.patch("pt8", {"system": "the task's own"})
    own = Conversation((("system", "mine"), ("user", "hello")))
    out = engine.tokenize(EngineRequest(task="pt8", conversation=own))
    assert out.ids == list(engine.tokenizer(own.render(engine.tokenizer), add_special_tokens=False)["input_ids"])
