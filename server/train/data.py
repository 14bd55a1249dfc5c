"""Training examples: read and checked before any training (file, line and reason on the first bad one),
then tokenized exactly as the server will see them.

A line is `{"input": ..., "output": ...}`. The input goes through the task's template (`{text}` replaced
literally) and `tokenizer(text)`, as `POST /generate` tokenizes a request's text; the output's tokens are
`tokenizer(output, add_special_tokens=False)` followed by the end-of-sequence token, so a served answer
stops where the training answer did. Only the output's tokens count in the loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prompt_store.errors import InvalidTemplate
from prompt_store.template import apply_template, check_template

IGNORE = -100  # the label of a token the loss does not count (transformers' convention)


class DataError(ValueError):
    """Bad training data: where (file and line) and why. Nothing was trained."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class Example:
    input: str
    output: str
    path: str
    line: int


@dataclass(frozen=True, slots=True)
class Encoded:
    input_ids: list[int]  # the templated input, then the output's tokens and the end-of-sequence token
    labels: list[int]  # IGNORE over the input, the output's tokens after it
    prompt_length: int  # how many of input_ids are the input


def read_examples(path: Path | str) -> list[Example]:
    """Every example of a JSONL file, or DataError naming the first bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(path, None, f"cannot be read ({exc.strerror or exc})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except ValueError as exc:
            raise DataError(path, number, f"not a JSON object ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f'expected a JSON object {{"input": ..., "output": ...}}, got '
                                          f"{type(record).__name__}")
        for field in ("input", "output"):
            if field not in record:
                raise DataError(path, number, f'missing the field "{field}" (a line is {{"input": ..., '
                                              f'"output": ...}})')
            if not isinstance(record[field], str):
                raise DataError(path, number, f'"{field}" must be a string, got {type(record[field]).__name__}')
        if not record["output"].strip():
            raise DataError(path, number, 'the "output" is empty')
        examples.append(Example(record["input"], record["output"], str(path), number))
    if not examples:
        raise DataError(path, None, 'no examples: the file is empty (expected one {"input": ..., "output": ...} '
                                    "per line)")
    return examples


def checked_template(template: str | None) -> str | None:
    if template is None:
        return None
    try:
        return check_template(template)
    except InvalidTemplate as exc:
        raise DataError("--template", None, exc.message) from None


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): `fraction` of the examples drawn at random (at least one when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-split must be in [0, 1), got {fraction}")
    if fraction == 0 or len(examples) < 2:
        return list(examples), []
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * fraction))
    return shuffled[n_val:], shuffled[:n_val]


def encode(example: Example, tokenizer: Any, template: str | None, max_length: int) -> Encoded:
    """One example as the model trains on it; DataError when it cannot be (empty output, too long)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(example.path, None, "the tokenizer has no end-of-sequence token, so a trained answer "
                                            "could never stop")
    prompt = list(tokenizer(apply_template(template, example.input))["input_ids"])
    if not prompt:
        raise DataError(example.path, example.line, 'the "input" (templated) gives no token')
    answer = list(tokenizer(example.output, add_special_tokens=False)["input_ids"])
    if not answer:
        raise DataError(example.path, example.line, f'the "output" {example.output[:40]!r} tokenizes to nothing')
    answer.append(eos)
    total = len(prompt) + len(answer)
    if total > max_length:
        raise DataError(example.path, example.line, f"{total} tokens (input {len(prompt)} + output {len(answer)}, "
                                                    f"end-of-sequence included) is over --max-length {max_length}")
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt))


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: padding is masked out of attention and of the loss."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        fill = width - len(f["input_ids"])
        ids.append(f["input_ids"] + [pad_id] * fill)
        mask.append([1] * len(f["input_ids"]) + [0] * fill)
        labels.append(f["labels"] + [IGNORE] * fill)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
