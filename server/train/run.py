"""Train one task: examples in, a PEFT adapter directory out, with transformers' Trainer doing the loop.

The base model is frozen (PEFT trains only the virtual tokens, the prompt encoder or the prefix). Each
epoch ends with the validation loss, and the best epoch's adapter is kept (early stopping after
`patience` epochs without improvement). Accuracy is measured on that adapter as saved and loaded back,
with a greedy loop of our own over `PeftModel.forward` (PeftModel.generate is wrong for prompt learning
on transformers 5.24), on the templated input as the server will see it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prompt_store.errors import InvalidChoices
from prompt_store.template import check_choices, encode_choices
from server.train.data import Encoded, Example, checked_template, encode, pad_batch, read_examples, split
from server.train.peft_setup import DEFAULT_LR, TrainKind, peft_config

log = logging.getLogger("promptswap.train")


@dataclass(frozen=True, slots=True)
class TrainOptions:
    model_path: str  # what to load (a directory or hub id)
    served_name: str  # the base model's name as the server serves it: recorded in the adapter
    data: Path
    out: Path
    kind: TrainKind = "prompt"
    num_virtual_tokens: int = 20
    template: str | None = None
    init_text: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    epochs: int = 10
    lr: float | None = None  # None: the kind's default (peft_setup.DEFAULT_LR)
    batch_size: int = 8
    max_length: int = 256
    val_split: float = 0.1
    val: Path | None = None
    patience: int = 2
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True
    threads: int | None = None  # torch's intra-op threads while training; None: the cores this process may use


@dataclass(frozen=True, slots=True)
class TrainSummary:
    train_examples: int
    val_examples: int
    epochs: float  # epochs run (early stopping may end sooner)
    stopped_early: bool
    best_val_loss: float | None
    correct: int
    measured_on: int
    accuracy_on: str  # "validation" or "training" (no validation set)
    seconds: float
    out: Path
    choices: tuple[str, ...] | None

    @property
    def accuracy(self) -> float:
        return self.correct / self.measured_on if self.measured_on else 0.0


@dataclass(frozen=True, slots=True)
class Prepared:
    train: list[tuple[Example, Encoded]]
    val: list[tuple[Example, Encoded]]
    template: str | None
    choices: tuple[str, ...] | None


def prepare(opts: TrainOptions, tokenizer: Any) -> Prepared:
    """Read, check and tokenize every example before anything trains: DataError names file, line and reason."""
    template = checked_template(opts.template)
    examples = read_examples(opts.data)
    if opts.val is not None:
        train_ex, val_ex = examples, read_examples(opts.val)
    else:
        train_ex, val_ex = split(examples, opts.val_split, opts.seed)
    encoded_train = [(e, encode(e, tokenizer, template, opts.max_length)) for e in train_ex]
    encoded_val = [(e, encode(e, tokenizer, template, opts.max_length)) for e in val_ex]
    outputs = list(dict.fromkeys(e.output for e in examples + ([] if opts.val is None else val_ex)))
    try:  # a classifier's answers; a generative task's outputs are none (too many, or too long to be labels)
        choices: tuple[str, ...] | None = check_choices(outputs)
    except InvalidChoices:
        choices = None
    return Prepared(encoded_train, encoded_val, template, choices)


def train(opts: TrainOptions) -> TrainSummary:
    """Train, measure and write the adapter to `opts.out`."""
    return fit(opts)[1]


def fit(opts: TrainOptions) -> tuple[Any, TrainSummary]:
    """train(), also returning the trained PeftModel (tests look at its frozen base)."""
    from server.machine.threads import threads_for

    # As the engine counts them (server/machine/threads.py): torch's own default ignores a cgroup's CPU quota.
    with threads_for(opts.threads), quiet_deprecations():
        return _fit(opts)


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """While training, and only then: no notices about transformers' and PEFT's own internals, which a user
    can do nothing about (PEFT's prefix tuning passes `past_key_values`, which transformers renamed `cache`;
    the FutureWarning names torch's module, so a filter on transformers' module does not catch it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        yield


def _fit(opts: TrainOptions) -> tuple[Any, TrainSummary]:
    import warnings

    import transformers
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from prompt_store.dtypes import torch_dtype
    from server.model.model_loader import resolve_device

    started = time.monotonic()
    # Deprecation notices of transformers/PEFT internals and checkpoint bookkeeping say nothing to a user.
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    tokenizer = AutoTokenizer.from_pretrained(opts.model_path)
    data = prepare(opts, tokenizer)
    device = resolve_device(opts.device)
    transformers.set_seed(opts.seed)
    base = AutoModelForCausalLM.from_pretrained(opts.model_path, dtype=torch_dtype(opts.dtype)).to(device)
    config = peft_config(opts.kind, opts.num_virtual_tokens, model_path=opts.model_path, init_text=opts.init_text,
                         encoder_hidden_size=opts.encoder_hidden_size, prefix_projection=opts.prefix_projection)
    model = get_peft_model(base, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    has_val = bool(data.val)
    steps_per_epoch = -(-len(data.train) // opts.batch_size)
    with tempfile.TemporaryDirectory(prefix="promptswap-train-") as work:
        best = Path(work) / "best"
        args = TrainingArguments(
            output_dir=work, num_train_epochs=opts.epochs, learning_rate=opts.lr or DEFAULT_LR[opts.kind],
            per_device_train_batch_size=opts.batch_size, per_device_eval_batch_size=opts.batch_size,
            # The best epoch is kept by KeepBest, not by the Trainer's checkpoints: a prefix learned through
            # a projection is saved as its tables, which cannot be loaded back into the projection.
            eval_strategy="epoch" if has_val else "no", save_strategy="no", logging_strategy="steps",
            logging_steps=max(1, steps_per_epoch // 4), report_to="none", disable_tqdm=True, seed=opts.seed,
            use_cpu=device.type == "cpu", label_names=["labels"], remove_unused_columns=False,
            dataloader_pin_memory=False, optim="adamw_torch", lr_scheduler_type="linear",
        )
        keep = keep_best(best, opts.patience)
        trainer = Trainer(
            model=model, args=args, callbacks=[keep, *([loss_bar()] if opts.progress else [])],
            train_dataset=[{"input_ids": enc.input_ids, "labels": enc.labels} for _, enc in data.train],
            eval_dataset=[{"input_ids": enc.input_ids, "labels": enc.labels} for _, enc in data.val] or None,
            data_collator=lambda features: pad_batch(features, pad_id),
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        trainer.train()
        if not best.exists():  # no validation set: the last epoch is the result
            model.save_pretrained(str(best))
        # Measured as served: the saved adapter, loaded back, on the frozen base.
        trained = PeftModel.from_pretrained(model.get_base_model(), str(best)).to(device).eval()
        measured = data.val or data.train
        correct = sum(exact_match(trained, tokenizer, example, enc, device) for example, enc in measured)
        write_adapter(best, opts.out, served_name=opts.served_name, template=data.template, choices=data.choices)
    epochs = float(trainer.state.epoch or 0)
    return trained, TrainSummary(
        train_examples=len(data.train), val_examples=len(data.val), epochs=epochs,
        stopped_early=epochs < opts.epochs - 1e-9, best_val_loss=keep.best_loss, correct=correct,
        measured_on=len(measured), accuracy_on="validation" if data.val else "training",
        seconds=time.monotonic() - started, out=opts.out, choices=data.choices,
    )


def keep_best(directory: Path, patience: int) -> Any:
    """After each evaluation: save the adapter when the validation loss is the best so far; stop training
    after `patience` evaluations without a better one."""
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        def __init__(self) -> None:
            self.best_loss: float | None = None
            self.worse = 0

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, model: Any = None,
                        **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if self.best_loss is None or loss < self.best_loss:
                self.best_loss, self.worse = loss, 0
                model.save_pretrained(str(directory))
            else:
                self.worse += 1
                if self.worse >= patience:
                    control.should_training_stop = True

    return KeepBest()


def greedy_answer(model: Any, prompt_ids: list[int], max_new_tokens: int, eos_id: int, device: Any) -> list[int]:
    """Greedy tokens after `prompt_ids`, by a forward pass over the whole sequence each step (no cache), until
    the end-of-sequence token (not included) or `max_new_tokens`."""
    import torch

    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            x = torch.tensor([prompt_ids + out], device=device)
            token = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
    return out


def exact_match(model: Any, tokenizer: Any, example: Example, enc: Encoded, device: Any) -> bool:
    answer_tokens = len(enc.input_ids) - enc.prompt_length  # the output's tokens and the end-of-sequence token
    generated = greedy_answer(model, enc.input_ids[:enc.prompt_length], answer_tokens + 1, tokenizer.eos_token_id,
                              device)
    return tokenizer.decode(generated, skip_special_tokens=True).strip() == example.output.strip()


def write_adapter(saved: Path, out: Path, *, served_name: str, template: str | None,
                  choices: tuple[str, ...] | None) -> None:
    """The adapter PEFT saved in `saved`, written to `out` unchanged in form (PeftModel.from_pretrained loads
    it), with the served base model recorded in its config and the template and choices in its safetensors
    metadata (the store reads them; PEFT ignores them)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(saved / name, out / name)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = served_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = out / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    if template is not None:
        metadata["template"] = template
    if choices is not None:
        metadata["choices"] = encode_choices(choices)
    save_file(tensors, str(weights), metadata=metadata)


def loss_bar() -> Any:
    """A progress bar over the training steps, showing the latest loss and validation loss."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class LossBar(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.postfix: dict[str, str] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.4f}"
            if "eval_loss" in logs:
                self.postfix["val_loss"] = f"{logs['eval_loss']:.4f}"
            if self.bar is not None:
                self.bar.set_postfix(self.postfix, refresh=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()

    return LossBar()
