"""The model runner: owns the model, the KV slots and the task prefixes; runs one packed step.

Batching decisions live in the scheduler and request state in `Sequence`; the runner turns a
list of `(sequence, n_tokens)` into one forward pass and returns the logits of the requests that
pick a token this step.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from prompt_store.registry import PromptSnapshot
from server.engine.attention import LAYOUT_KWARG, DecodeGroup, PrefillChunk, StepLayout
from server.engine.kv import SlotKV
from server.engine.kv_budget import SlotBudget
from server.engine.model_loader import BaseModel
from server.engine.prompt_cache import PrefixKV, PromptCache
from server.engine.scheduler import Batch
from server.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, base: BaseModel, *, kv_budget_bytes: int, prompt_cache: PromptCache,
                 max_running: int | None = None) -> None:
        self.base = base
        self.model = base.model
        self.device = base.device
        g = base.geometry
        self.kv = SlotKV(g.num_layers, g.num_kv_heads, g.head_dim, dtype=base.dtype, device=base.device,
                         budget_bytes=kv_budget_bytes, max_slots=max_running)
        self.prompt_cache = prompt_cache

    @property
    def kv_budget(self) -> SlotBudget:
        assert self.kv.budget is not None  # the runner's store always has one
        return self.kv.budget

    # -- slots ---------------------------------------------------------------------------------

    def reserve(self, joining: list[Sequence], upcoming: Collection[Sequence] = ()) -> None:
        """Size the KV slots once for a burst (see SlotKV.reserve)."""
        self.kv.reserve(joining, upcoming)

    def add(self, seq: Sequence) -> None:
        """Give `seq` a KV slot and copy its task prefix (if any) into the first positions."""
        prefix = self.prefix_for(seq.prompt) if seq.prompt is not None else None
        slot = self.kv.assign(seq)
        if prefix is not None:
            self.kv.load_prefix(slot, *prefix)

    def remove(self, seq: Sequence) -> None:
        self.kv.free(seq)

    @property
    def running(self) -> int:
        return len(self.kv.holders)

    # -- task prefixes -------------------------------------------------------------------------

    def prefix_for(self, snapshot: PromptSnapshot) -> PrefixKV:
        return self.prompt_cache.get_or_compute(snapshot.key, lambda: self.compute_prefix(snapshot))

    @torch.inference_mode()
    def compute_prefix(self, snapshot: PromptSnapshot) -> PrefixKV:
        """A task's keys and values for every layer, `[layers, kv_heads, n, head_dim]` each."""
        g = self.base.geometry
        emb = snapshot.embeddings.to(device=self.device, dtype=self.base.dtype)
        if snapshot.kind == "prefix":
            keys, values = g.split_prefix(emb)
            return keys.contiguous(), values.contiguous()
        # A soft prompt's keys and values depend only on itself (causal attention), so run it once
        # through the frozen model at positions 0..n-1 and keep what every layer stored.
        n = emb.shape[0]
        scratch = SlotKV(g.num_layers, g.num_kv_heads, g.head_dim, dtype=self.base.dtype, device=self.device)
        scratch.ensure(1, n)
        positions = torch.arange(n, device=self.device)
        layout = StepLayout(scratch, torch.zeros(n, dtype=torch.long, device=self.device), positions,
                            None, [PrefillChunk(0, n, 0, 0)])
        self.model(inputs_embeds=emb[None], position_ids=positions[None], logits_to_keep=1, use_cache=False,
                   **{LAYOUT_KWARG: layout})
        keys, values = scratch.slot_all_layers(0, n)
        return keys.clone(), values.clone()

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Compute `n` new tokens of each sequence in one pass; return float32 logits `[k, vocab]`
        for the k sequences whose last token was computed (they sample next), in batch order."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tokens: list[int] = []
        decode_slots: list[int] = []
        decode_lengths: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_at: list[int] = []
        for seq, n in batch:
            assert seq.slot is not None, "a scheduled request holds a slot"
            start = len(ids)
            first = seq.num_virtual + seq.num_cached  # position of the first new token
            ids.extend(seq.all_ids[seq.num_cached:seq.num_cached + n])
            positions.extend(range(first, first + n))
            slots.extend([seq.slot] * n)
            if n == 1:
                decode_tokens.append(start)
                decode_slots.append(seq.slot)
                decode_lengths.append(first + 1)
            else:
                prefills.append(PrefillChunk(start, n, seq.slot, first))
            if seq.samples_after(n):
                sample_at.append(start + n - 1)
        dev = self.device
        decode = None
        if decode_tokens:
            lengths = torch.ones(self.running, dtype=torch.long)
            lengths[decode_slots] = torch.tensor(decode_lengths)
            decode = DecodeGroup(torch.tensor(decode_tokens, device=dev), torch.tensor(decode_slots, device=dev),
                                 lengths.to(dev), self.running, max(decode_lengths))
        layout = StepLayout(self.kv, torch.tensor(slots, device=dev), torch.tensor(positions, device=dev),
                            decode, prefills)
        keep = torch.tensor(sample_at if sample_at else [len(ids) - 1], device=dev)
        out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([positions], device=dev),
                         logits_to_keep=keep, use_cache=False, **{LAYOUT_KWARG: layout})
        logits = out.logits[0].float()  # [k, vocab]
        return logits if sample_at else logits[:0]
