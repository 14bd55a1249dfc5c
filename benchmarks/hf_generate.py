"""transformers `generate` on one batch of requests that share a task: what a PEFT user runs today.

Not `PeftModel.generate`: on transformers 5.24 / peft 0.21.2 it is silently wrong for prompt
learning (see shared/DESIGN.md). We build the inputs PEFT trains with ourselves:
- soft prompt: `inputs_embeds = cat(prompt, embed(ids))`; the text continues at position n;
- prefix: a DynamicCache prefilled with the prefix keys/values; the text starts at position p.
Rows are left-padded; the mask is `[virtual ones | pad zeros | text ones]`, so the positions that
`generate` derives from it (cumsum - 1) put every row's text right after its virtual tokens.
Decoding is greedy and never stops at EOS, so every system makes the same number of tokens.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from benchmarks.workload import Task
from prompt_store.geometry import ModelGeometry


@dataclass(frozen=True)
class BatchOutput:
    token_ids: list[list[int]]  # per row, exactly that row's max_new_tokens
    first_token_s: float  # perf_counter when the first token's logits were ready
    done_s: float


class _FirstLogits(LogitsProcessor):
    """Timestamps the first decoding step: `generate` calls processors once the first logits exist."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


class HFGenerator:
    """Runs `model.generate` for a batch of texts sharing one task (or none)."""

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.geometry = ModelGeometry.from_config(model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # generate fills unset fields from model.generation_config, so "no EOS" must live there.
        self._gen_config = copy.deepcopy(model.generation_config)
        self._gen_config.eos_token_id = None
        self._gen_config.pad_token_id = self.pad_id
        self._gen_config.do_sample = False
        self._gen_config.temperature = self._gen_config.top_p = self._gen_config.top_k = None

    def encode(self, text: str) -> list[int]:
        # Same call as the engine, so both see the same ids (a BOS where the tokenizer adds one).
        return self.tokenizer(text)["input_ids"]

    @torch.inference_mode()
    def generate(self, task: Task | None, texts: list[str], max_new_tokens: list[int]) -> BatchOutput:
        device = self.model.device
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last token is at the end
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs = self._task_inputs(task, ids, mask)
        first = _FirstLogits()
        with self._no_eos():
            out = self.model.generate(
                **kwargs,
                max_new_tokens=max(max_new_tokens),
                logits_processor=LogitsProcessorList([first]),
            )
        done = time.perf_counter()
        new = out[:, -max(max_new_tokens) :].tolist()  # input_ids runs return the input too
        return BatchOutput([row[:m] for row, m in zip(new, max_new_tokens, strict=True)], first.at, done)

    def _task_inputs(self, task: Task | None, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        batch = ids.shape[0]
        if task is None:
            return {"input_ids": ids, "attention_mask": mask}
        dtype, device = self.model.dtype, self.model.device
        table = task.table.to(device=device, dtype=dtype)
        ones = torch.ones((batch, task.num_virtual), dtype=mask.dtype, device=device)
        full_mask = torch.cat([ones, mask], dim=1)
        if task.kind == "prompt":
            embeds = self.model.get_input_embeddings()(ids)
            embeds = torch.cat([table.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
            return {"inputs_embeds": embeds, "attention_mask": full_mask}
        layers = [
            (k.to(device, dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
             v.to(device, dtype).unsqueeze(0).expand(batch, -1, -1, -1).contiguous())
            for k, v in task.prefix_kv(self.geometry)
        ]
        cache = DynamicCache(layers, config=self.model.config)
        return {"input_ids": ids, "attention_mask": full_mask, "cache": cache}

    @contextlib.contextmanager
    def _no_eos(self):
        saved = self.model.generation_config
        self.model.generation_config = self._gen_config
        try:
            yield
        finally:
            self.model.generation_config = saved
