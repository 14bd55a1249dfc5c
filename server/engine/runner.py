"""The model runner: owns the model, the KV slots and the task prefixes; runs one packed step.

Batching decisions live in the scheduler and request state in `Sequence`; the runner turns a
list of `(sequence, n_tokens)` into one forward pass and returns the logits of the requests that
pick a token this step.
"""

from __future__ import annotations

import itertools

import torch

from server.engine.attention import LAYOUT_KWARG, DecodeGroup, PrefillChunk, StepLayout
from server.engine.kv import SlotKV
from server.engine.model_loader import BaseModel
from server.engine.prompt_cache import PrefixKV, PromptCache
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
        self._owners: list[Sequence] = []  # slot i is held by _owners[i]; kept compact

    # -- slots ---------------------------------------------------------------------------------

    def reserve(self, joining: list[Sequence], upcoming=()) -> None:
        """Size the KV slots once for everyone joining this step and for the requests queued behind
        them (up to the running limit): each regrowth zero-fills and copies every layer's buffer."""
        if not joining:
            return
        room = self.kv.max_slots or len(self._owners) + len(joining) + len(upcoming)
        queued = list(itertools.islice(upcoming, max(0, room - len(self._owners) - len(joining))))
        slots, longest = self._need(self._owners + joining + queued)
        if not self.kv.fits(slots, longest):  # the queue may not all fit: size for this step alone
            slots, longest = self._need(self._owners + joining)
        self.kv.ensure(slots, longest)

    @staticmethod
    def _need(seqs: list[Sequence]) -> tuple[int, int]:
        return len(seqs), max(s.max_total_len for s in seqs)

    def add(self, seq: Sequence) -> None:
        """Give `seq` a KV slot and copy its task prefix (if any) into the first positions."""
        prefix = self.prefix_for(seq.prompt) if seq.prompt is not None else None
        longest = max([s.max_total_len for s in self._owners] + [seq.max_total_len])
        self.kv.ensure(len(self._owners) + 1, longest)
        seq.slot = len(self._owners)
        self._owners.append(seq)
        if prefix is not None:
            self.kv.load_prefix(seq.slot, *prefix)

    def remove(self, seq: Sequence) -> None:
        """Free `seq`'s slot at once; the last slot moves into the hole so slots stay compact."""
        if seq.slot is None:
            return
        hole, last = seq.slot, len(self._owners) - 1
        if hole != last:
            mover = self._owners[last]
            self.kv.move(last, hole, mover.num_virtual + mover.num_cached)
            mover.slot = hole
            self._owners[hole] = mover
        self._owners.pop()
        seq.slot = None
        if not self._owners:
            self.kv.release()

    @property
    def running(self) -> int:
        return len(self._owners)

    # -- task prefixes -------------------------------------------------------------------------

    def prefix_for(self, snapshot) -> PrefixKV:
        return self.prompt_cache.get_or_compute(snapshot.key, lambda: self._compute_prefix(snapshot))

    @torch.inference_mode()
    def _compute_prefix(self, snapshot) -> PrefixKV:
        g = self.base.geometry
        emb = snapshot.embeddings.to(device=self.device, dtype=self.base.dtype)
        n = emb.shape[0]
        if snapshot.kind == "prefix":
            # PEFT layout: [n, L*2*kv_dim] -> [2L, kv_heads, n, hd]; row 2l is layer l's keys, 2l+1 its values.
            kv = emb.view(n, 2 * g.num_layers, g.num_kv_heads, g.head_dim).permute(1, 2, 0, 3)
            return kv[0::2].contiguous(), kv[1::2].contiguous()
        # A soft prompt's keys and values depend only on itself (causal attention), so run it once
        # through the frozen model at positions 0..n-1 and keep what every layer stored.
        scratch = SlotKV(g.num_layers, g.num_kv_heads, g.head_dim, dtype=self.base.dtype, device=self.device)
        scratch.ensure(1, n)
        positions = torch.arange(n, device=self.device)
        layout = StepLayout(scratch, torch.zeros(n, dtype=torch.long, device=self.device), positions,
                            None, [PrefillChunk(0, n, 0, 0)])
        self.model(inputs_embeds=emb[None], position_ids=positions[None], logits_to_keep=1, use_cache=False,
                   **{LAYOUT_KWARG: layout})
        return scratch.keys[:, 0, :, :n].clone(), scratch.values[:, 0, :, :n].clone()

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
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
            if seq.num_cached + n == seq.num_tokens:
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
