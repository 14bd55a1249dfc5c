"""POST /v1/chat/completions with the openai client: the tokenizer's chat template, the task's virtual tokens
before the whole templated conversation, greedy tokens equal to PEFT's over the same conversation, streaming,
logprobs in OpenAI's chat shape, and clear refusals."""

from __future__ import annotations

import openai
import pytest
import torch
from safetensors.torch import save

from tests.api.conftest import upload_raw
from tests.peft_reference import greedy, load_reference

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Where is the station?"},
            {"role": "assistant", "content": "Turn left."},
            {"role": "user", "content": "And then?"}]


PROMPT = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))  # the task's virtual tokens


@pytest.fixture(scope="module")
def oa(llama_server):
    with llama_server.client() as c:  # a soft prompt with a text template: chat must not apply the template
        prompt = save({"prompt_embeddings": PROMPT}, metadata={"kind": "prompt", "template": "IGNORED {text} IGNORED"})
        assert upload_raw(c, "chatty", prompt).status_code == 201
        yield openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(llama_dir, tmp_path_factory):
    """PEFT over the same templated conversation, for the uploaded task."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
    out = tmp_path_factory.mktemp("chatty")
    model.save_pretrained(str(out))
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": PROMPT.contiguous()}, str(out / "adapter_model.safetensors"))
    peft = load_reference(llama_dir, out)
    ids = list(tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    return tokenizer, peft, ids


def test_chat_answers_with_the_tasks_tokens_over_the_templated_conversation(oa, reference):
    tokenizer, peft, ids = reference
    done = oa.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                      extra_body={"ignore_eos": True})
    expected = greedy(peft, ids, 8)
    assert done.choices[0].message.role == "assistant"
    # token by token (the text itself holds back a last token that ends inside a UTF-8 character)
    assert [e.token for e in done.choices[0].logprobs.content] == [tokenizer.decode([t]) for t in expected]
    assert tokenizer.decode(expected).startswith(done.choices[0].message.content)
    assert done.usage.prompt_tokens == len(ids)  # the chat template, not the task's text template
    assert done.object == "chat.completion" and done.choices[0].finish_reason == "length"


def test_streamed_chat_gives_the_same_text(oa):
    whole = oa.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = list(oa.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs_in_openais_shape(oa, reference):
    tokenizer, peft, ids = reference
    done = oa.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True,
                                      top_logprobs=2, extra_body={"ignore_eos": True})
    content = done.choices[0].logprobs.content
    generated = greedy(peft, ids, 3)
    x = torch.tensor([ids + generated])
    with torch.inference_mode():
        rows = torch.log_softmax(peft(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)
    rows = rows[rows.shape[0] - x.shape[1]:]
    for i, entry in enumerate(content):
        row = rows[len(ids) - 1 + i]
        assert entry.token == tokenizer.decode([generated[i]])
        assert entry.logprob == pytest.approx(row[generated[i]].item(), abs=2e-4)
        assert entry.bytes == list(entry.token.encode("utf-8")) and len(entry.top_logprobs) == 2


def test_chat_refusals_name_the_field(oa, start_server, gpt2_dir):
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "hi"}] * 257)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(model="chatty", messages=MESSAGES, n=17)  # n > 1 is served (test_samples_http)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-task", messages=MESSAGES)
    for extra, param in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"tool_choice": "auto"},
                         "tool_choice"), ({"functions": [{"name": "f"}]}, "functions")):
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(model="chatty", messages=MESSAGES, extra_body=extra)
        assert err.value.body["param"] == param
    no_template = start_server(model=str(gpt2_dir))
    plain = openai.OpenAI(base_url=f"{no_template.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        plain.chat.completions.create(model=no_template.settings.model_name(), messages=MESSAGES)
    assert err.value.body["param"] == "messages" and "chat template" in err.value.body["message"]
    no_template.stop()


def test_a_long_system_message_is_computed_once_and_read_by_later_chats(oa, reference, llama_server):
    """Automatic prefix caching through chat: the second conversation with the same long system message reads its
    pages (counted on /metrics) and still answers with PEFT's greedy tokens over its own conversation."""
    from tests.api.conftest import scrape_metrics

    tokenizer, peft, _ = reference
    system = {"role": "system", "content": "You are the station's help desk. " * 12}
    with llama_server.client() as c:
        before = scrape_metrics(c)
    answers, cached = [], []
    for question in ("Where is the station?", "When does the last train leave?"):
        messages = [system, {"role": "user", "content": question}]
        done = oa.chat.completions.create(model="chatty", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, extra_body={"ignore_eos": True})
        cached.append(done.usage.prompt_tokens_details.cached_tokens)
        ids = list(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"])
        assert [e.token for e in done.choices[0].logprobs.content] == [tokenizer.decode([t])
                                                                       for t in greedy(peft, ids, 6)]
        answers.append(len(ids))
    with llama_server.client() as c:
        after = scrape_metrics(c)
    hits = after[("promptswap_prefix_cache_hits_total", ())] - before.get(("promptswap_prefix_cache_hits_total", ()), 0)
    queries = (after[("promptswap_prefix_cache_queries_total", ())]
               - before.get(("promptswap_prefix_cache_queries_total", ()), 0))
    assert queries == sum(answers) and hits >= 4 * 16  # the system message's pages, read by the second
    assert sum(cached) == hits and cached[1] >= 4 * 16  # OpenAI's usage says the same, request by request


def test_a_task_may_carry_the_chat_system_message_its_conversations_get_when_they_bring_none(oa, llama_server):
    """A task's `system` (file metadata, or PATCH) opens a conversation that has no system message of its own;
    one that brings its own keeps it. PATCH changes it; GET shows it."""
    tokenizer = llama_server.tokenizer
    question = [{"role": "user", "content": "Where is the station?"}]

    def prompt_tokens(messages) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def asked(messages) -> int:
        done = oa.chat.completions.create(model="narrator", messages=messages, max_tokens=2, temperature=0)
        return done.usage.prompt_tokens

    with llama_server.client() as c:
        weights = save({"prompt_embeddings": PROMPT}, metadata={"kind": "prompt", "system": "Speak like a narrator."})
        assert upload_raw(c, "narrator", weights).status_code == 201
        assert c.get("/prompts/narrator").json()["system"] == "Speak like a narrator."
        assert asked(question) == prompt_tokens([{"role": "system", "content": "Speak like a narrator."}, *question])
        own = [{"role": "system", "content": "Be brief."}, *question]
        assert asked(own) == prompt_tokens(own)  # its own system message wins
        r = c.patch("/prompts/narrator", json={"system": "Speak like a sailor on a long voyage."})
        assert r.status_code == 200 and r.json()["system"] == "Speak like a sailor on a long voyage."
        assert asked(question) == prompt_tokens([{"role": "system", "content": "Speak like a sailor on a long voyage."},
                                                 *question])
        assert c.patch("/prompts/narrator", json={"system": None}).json()["system"] is None
        assert asked(question) == prompt_tokens(question)  # none: the chat template's own default
        bad = c.patch("/prompts/narrator", json={"system": 42})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "system", bad.text
