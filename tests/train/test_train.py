"""`promptswap train` end to end on the tiny Llama: bad data stops before training (file, line, reason);
two tasks whose answers differ train to a stated accuracy, upload to a running server, and each request of
a mixed batch gets its own task's answer, the server's greedy tokens equal to PEFT's on the templated text."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import torch

from prompt_store.template import apply_template
from server.process.cli import main
from server.train.data import DataError, encode, read_examples
from server.train.run import TrainOptions, fit
from tests.peft_reference import PeftReference
from tests.serve_process import start_serve_process

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "soft", "prompt", "list", "learned",
         "embeddings", "prefix", "keys", "values"]
# Two tasks that answer every input with one fixed word each: a soft prompt learns that in seconds on a
# random tiny model (longer answers plateau there). The stated accuracy: every validation example.
TASKS = {"says-positive": ("prompt", "Positive"), "says-negative": ("prefix", "Negative")}
ADMIN = "train-admin-token"


def write_examples(path, answer: str, n: int = 60, seed: int = 0):
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"input": text, "output": answer}) + "\n")
    return path


@pytest.mark.parametrize(("lines", "reason"), [
    (["{\"input\": \"a\", \"output\": \"b\"}", "{\"input\": \"a\"}"], ':2: missing the field "output"'),
    (["{\"input\": \"a\", \"output\": \"b\"}", "not json"], ":2: not a JSON object"),
    (["[1, 2]"], ":1: expected a JSON object"),
    (["{\"input\": 3, \"output\": \"b\"}"], ':1: "input" must be a string'),
    (["{\"input\": \"a\", \"output\": \"  \"}"], ':1: the "output" is empty'),
    ([], "no examples: the file is empty"),
])
def test_bad_data_names_file_line_and_reason(tmp_path, lines, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError) as caught:
        read_examples(path)
    assert str(caught.value).startswith(str(path)) and reason in str(caught.value)


def test_an_output_that_tokenizes_to_nothing_is_named(tmp_path):
    """A real tokenizer whose normalizer drops control characters: the output "\\x00" gives no token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(clean_text=True)
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"input": "a", "output": "\x00"}) + "\n")
    (example,) = read_examples(path)
    with pytest.raises(DataError, match=r"data.jsonl:1: the \"output\" .* tokenizes to nothing"):
        encode(example, tokenizer, None, 64)


def test_the_command_refuses_bad_options_and_data_before_training(tmp_path, llama_dir, capsys):
    data = write_examples(tmp_path / "ok.jsonl", "Positive")
    common = ["train", "--model", str(llama_dir), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*common, "--data", str(data), "--template", "no placeholder"]) == 2
    assert "--template" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    assert main([*common, "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl:2: missing the field "output"' in capsys.readouterr().err
    assert main([*common, "--data", str(data), "--kind", "prefix", "--init-text", "x"]) == 2
    assert main([*common, "--data", str(data), "--server", "http://127.0.0.1:9"]) == 2  # --task missing
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_training_leaves_the_base_model_unchanged_and_writes_a_peft_adapter(tmp_path, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_examples(tmp_path / "d.jsonl", "Positive", n=20)
    model, summary = fit(TrainOptions(model_path=str(llama_dir), served_name="llama", data=data, out=tmp_path / "a",
                                      kind="ptuning", num_virtual_tokens=4, template=TEMPLATE, epochs=2,
                                      encoder_hidden_size=16, progress=False))
    fresh = AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    trained_base = model.get_base_model().state_dict()
    assert fresh.keys() == trained_base.keys()
    assert all(torch.equal(fresh[k], trained_base[k].cpu()) for k in fresh)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(tmp_path / "a"))
    assert loaded.peft_config["default"].base_model_name_or_path == "llama"
    assert summary.choices == ("Positive",) and summary.train_examples + summary.val_examples == 20


def test_train_upload_and_serve_two_tasks(tmp_path, llama_dir, capsys, monkeypatch):
    proc, url = start_serve_process(llama_dir, tmp_path, "--admin-token", ADMIN, "--threads", "1",
                                    log_path=tmp_path / "serve.log")
    try:
        monkeypatch.setenv("PROMPTSWAP_ADMIN_TOKEN", ADMIN)
        for i, (task, (kind, answer)) in enumerate(TASKS.items()):
            data = write_examples(tmp_path / f"{task}.jsonl", answer, seed=i)
            status = main(["train", "--model", str(llama_dir), "--data", str(data), "--kind", kind,
                           "--num-virtual-tokens", "8", "--template", TEMPLATE, "--epochs", "20", "--lr", "0.1",
                           "--out", str(tmp_path / task), "--server", url, "--task", task, "--quiet"])
            printed = capsys.readouterr().out
            assert status == 0, printed
            assert "accuracy   6/6 = 100.0% exact match on the validation set" in printed, printed
            assert f"uploaded   {task} v" in printed and "warning" not in printed  # base model recorded right
        described = httpx.get(f"{url}/prompts/says-positive").json()
        assert described["template"] == TEMPLATE and described["choices"] == ["Positive"]
        texts = ["lazy brown dog", "soft keys over", "the fox", "prefix values learned list"]
        batch = [{"task": task, "text": text, "max_new_tokens": 8} for text in texts for task in TASKS]
        answers = httpx.post(f"{url}/generate/batch", json={"requests": batch}, timeout=60).json()["results"]
        for request, answer in zip(batch, answers, strict=True):
            assert answer["text"].strip() == TASKS[request["task"]][1], (request, answer)
            assert answer["finish_reason"] == "eos"
        reference = PeftReference(llama_dir)
        for task in TASKS:
            served = httpx.post(f"{url}/generate", json={"task": task, "text": texts[0], "max_new_tokens": 6,
                                                         "ignore_eos": True}, timeout=60).json()["token_ids"]
            assert served == reference.greedy(tmp_path / task, apply_template(TEMPLATE, texts[0]), 6)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("variant", [
    {"kind": "prompt", "init_text": "classify this review"},
    {"kind": "ptuning", "encoder_hidden_size": 16},
    {"kind": "prefix"},
    {"kind": "prefix", "prefix_projection": True, "encoder_hidden_size": 16},
])
def test_every_kind_writes_an_adapter_the_store_serves(tmp_path, llama_dir, variant):
    from transformers import AutoConfig

    from prompt_store import ModelGeometry, PromptRegistry

    data = write_examples(tmp_path / "d.jsonl", "Negative", n=12)
    out = tmp_path / "adapter"
    fit(TrainOptions(model_path=str(llama_dir), served_name="llama", data=data, out=out, num_virtual_tokens=3,
                     template=TEMPLATE, epochs=1, progress=False, **variant))
    registry = PromptRegistry(ModelGeometry.from_config(AutoConfig.from_pretrained(llama_dir)),
                              base_model_names=["llama"])
    snapshot, _ = registry.put_path("t", out)
    assert snapshot.num_virtual_tokens == 3 and snapshot.warnings == ()
    assert snapshot.kind == ("prefix" if variant["kind"] == "prefix" else "prompt")
    assert snapshot.template == TEMPLATE and snapshot.choices == ("Negative",)


def test_early_stopping_keeps_the_best_epoch(tmp_path, llama_dir):
    """A rate too high to settle, patience 1: training stops early, and the adapter written is the epoch with
    the best validation loss (its loss, recomputed with PEFT, is the one reported), not the last one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.train.data import pad_batch
    from server.train.run import prepare

    data = write_examples(tmp_path / "d.jsonl", "Positive", n=40)
    opts = TrainOptions(model_path=str(llama_dir), served_name="llama", data=data, out=tmp_path / "best",
                        num_virtual_tokens=4, epochs=30, patience=1, lr=1.0, progress=False)
    _, summary = fit(opts)
    assert summary.stopped_early and summary.epochs < 30
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    val = prepare(opts, tokenizer).val
    assert 0 < len(val) <= 8  # one evaluation batch, so the Trainer's mean is this mean
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(tmp_path / "best")).eval()
    batch = pad_batch([{"input_ids": e.input_ids, "labels": e.labels} for _, e in val], tokenizer.eos_token_id)
    with torch.inference_mode():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(summary.best_val_loss, rel=1e-4)


def test_outputs_too_long_to_be_labels_record_no_choices(tmp_path, llama_dir):
    """A small generative dataset: its outputs are not a classifier's labels, so the adapter stays servable."""
    from transformers import AutoTokenizer

    from server.train.run import prepare

    long_answer = "word " * 60  # 300 characters: over a choice's limit
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"input": f"in {i}", "output": long_answer + str(i % 2)}) + "\n"
                            for i in range(6)))
    opts = TrainOptions(model_path=str(llama_dir), served_name="llama", data=path, out=tmp_path / "o",
                        max_length=1024, progress=False)
    assert prepare(opts, AutoTokenizer.from_pretrained(llama_dir)).choices is None


def test_the_threads_flag_reaches_training_and_the_interop_pool(tmp_path, llama_dir, monkeypatch, capsys):
    from server.machine import threads as cpu_threads
    from server.train import run

    seen: dict[str, list] = {"train": [], "interop": []}

    def stop(opts):  # what training would get, without training
        seen["train"].append(opts.threads)
        raise DataError(opts.data, None, "stopped by the test")

    monkeypatch.setattr(run, "train", stop)
    monkeypatch.setattr(cpu_threads, "limit_interop_threads", seen["interop"].append)  # process-wide: not here
    data = write_examples(tmp_path / "d.jsonl", "Positive", n=4)
    common = ["train", "--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*common, "--threads", "3"]) == 2 and main(common) == 2
    assert seen == {"train": [3, None], "interop": [3, None]}  # None: the cores this process may use
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            main([*common, "--threads", bad])
    assert "--threads" in capsys.readouterr().err


def test_training_runs_on_the_cores_this_process_may_use(tmp_path, llama_dir, monkeypatch):
    """fit() takes usable_cpus() threads (as the engine does) while training, and gives the count back after."""
    from transformers import Trainer

    from server.machine import threads as cpu_threads

    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 1)
    during: list[int] = []
    original = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: during.append(torch.get_num_threads())
                        or original(self, *a, **k))
    before = torch.get_num_threads()
    data = write_examples(tmp_path / "d.jsonl", "Positive", n=6)
    fit(TrainOptions(model_path=str(llama_dir), served_name="llama", data=data, out=tmp_path / "a",
                     num_virtual_tokens=2, epochs=1, val_split=0, progress=False))
    assert during == [1] and torch.get_num_threads() == before


def test_training_does_not_show_the_past_key_values_deprecation(tmp_path, llama_dir):
    """PEFT's prefix tuning hands transformers `past_key_values` (now `cache`): a FutureWarning that says nothing to
    a user. It is filtered while training only; other warnings, and the same one after training, still show."""
    import warnings

    data = write_examples(tmp_path / "d.jsonl", "Positive", n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TrainOptions(model_path=str(llama_dir), served_name="llama", data=data, out=tmp_path / "a", kind="prefix",
                         num_virtual_tokens=2, epochs=1, val_split=0, progress=False))
        during = [str(w.message) for w in caught]
        warnings.warn("`past_key_values` is deprecated (after training)", FutureWarning, stacklevel=1)
    assert not [m for m in during if "past_key_values" in m], during
    assert str(caught[-1].message).endswith("(after training)")
