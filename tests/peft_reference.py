"""The one PEFT reference of the test suite: a greedy loop over `model.forward` on the whole
sequence, no cache, one request alone (DESIGN.md: `PeftModel.generate` is wrong for prompt
learning on transformers 5.24, and PEFT's own batches drop position ids)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: list[int], steps: int, process=None) -> list[int]:
    """`steps` greedy tokens after `ids`; `model` is a base model or a PeftModel around one. `process(x, logits,
    out)`, when given, changes the last logits `[1, vocab]` before the pick (x: the ids so far, out: the tokens
    generated so far), as a transformers logits processor would."""
    out: list[int] = []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float()
        if process is not None:
            logits = process(x, logits, out)
        out.append(int(logits[0].argmax()))
    return out


def load_reference(model_dir: str | Path, adapter_dir: str | Path | None = None) -> torch.nn.Module:
    """The base model with transformers' default attention (not promptswap's path), plus the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model


class PeftReference:
    """greedy(adapter_dir or None, text, steps) for one base model; models are loaded once per adapter."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._models: dict[str | None, torch.nn.Module] = {}

    def model(self, adapter_dir: str | Path | None) -> torch.nn.Module:
        key = None if adapter_dir is None else str(adapter_dir)
        if key not in self._models:
            self._models[key] = load_reference(self.model_dir, adapter_dir)
        return self._models[key]

    def greedy(self, adapter_dir: str | Path | None, text: str, steps: int) -> list[int]:
        return greedy(self.model(adapter_dir), list(self.tokenizer(text)["input_ids"]), steps)
