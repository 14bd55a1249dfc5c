"""The model runner: owns the model and the KV pool's storage; computes task prefixes; runs one step.

Batching and page decisions live in the scheduler (and `pages.py`), request state in `Sequence`;
the runner turns a list of `(sequence, n_tokens)` into one forward pass and returns the logits of
the requests that pick a token this step.
"""

from __future__ import annotations

import torch

from server.engine.attention import LAYOUT_KWARG, DecodeGroup, PageList, PrefillChunk, StepLayout, page_views
from server.engine.kv import PagedKV
from server.engine.model_loader import BaseModel
from server.engine.pages import PAGE_SIZE, SharedPrefix
from server.engine.scheduler import Batch
from server.engine.sequence import Sequence

# Decode requests are read in groups of similar length, so a short request never pays for the
# longest one's history: a group ends where a request holds more than this many times the first's pages.
GROUP_SPREAD = 2


class ModelRunner:
    def __init__(self, base: BaseModel, *, total_pages: int) -> None:
        self.base = base
        self.model = base.model
        self.device = base.device
        g = base.geometry
        self.kv = PagedKV(g.num_layers, g.num_kv_heads, g.head_dim, dtype=base.dtype, device=base.device,
                          total_pages=total_pages)

    # -- task prefixes -------------------------------------------------------------------------

    @torch.inference_mode()
    def compute_prefix(self, entry: SharedPrefix) -> None:
        """Fill a new shared prefix's pages with its task's keys and values, for every layer."""
        snapshot = entry.source
        g = self.base.geometry
        self.kv.ensure(max(entry.pages) + 1)
        emb = snapshot.embeddings.to(device=self.device, dtype=self.base.dtype)
        n = emb.shape[0]
        rows = _rows(entry.pages, 0, n, self.device)
        if snapshot.kind == "prefix":
            keys, values = g.split_prefix(emb)  # [layers, kv_heads, n, head_dim]
            for layer in range(g.num_layers):
                self.kv.write(layer, keys[layer], values[layer], rows)
            return
        # A soft prompt's keys and values depend only on itself (causal attention), so run it once
        # through the frozen model at positions 0..n-1 and keep what every layer stored.
        pages, positions = page_views([PageList(entry.pages)], self.device)
        chunk = PrefillChunk(0, n, 0, pages[0], positions[0])
        layout = StepLayout(self.kv, rows, [], [chunk])
        position_ids = torch.arange(n, device=self.device)[None]
        self.model(inputs_embeds=emb[None], position_ids=position_ids, logits_to_keep=1, use_cache=False,
                   **{LAYOUT_KWARG: layout})

    # -- storage -------------------------------------------------------------------------------

    def fit_storage(self, pages_handed_out: int, *, idle: bool = False) -> None:
        """Let the storage follow the pool: usable up to every page handed out; when nothing runs,
        give back what lies beyond the pages still held (cached task prefixes)."""
        if idle:
            self.kv.shrink(pages_handed_out)
        else:
            self.kv.ensure(pages_handed_out)

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Compute `n` new tokens of each sequence in one pass; return float32 logits `[k, vocab]`
        for the k sequences whose last token was computed (they sample next), in batch order."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        decoding: list[tuple[int, Sequence, int]] = []  # (packed offset, request, position of its token)
        chunks: list[tuple[int, Sequence, int, int]] = []  # (packed offset, request, n, first position)
        sample_at: list[int] = []
        for seq, n in batch:
            start = len(ids)
            first = seq.num_virtual + seq.num_cached  # position of the first new token
            ids.extend(seq.all_ids[seq.num_cached:seq.num_cached + n])
            positions.extend(range(first, first + n))
            rows.extend(_row_list(seq.pages, seq.num_cached, n))
            if n == 1:
                decoding.append((start, seq, first))
            else:
                chunks.append((start, seq, n, first))
            if seq.samples_after(n):
                sample_at.append(start + n - 1)
        prefills = []
        for start, seq, n, first in chunks:
            pages, held = page_views([_page_list(seq)], dev)
            prefills.append(PrefillChunk(start, n, first, pages[0], held[0]))
        layout = StepLayout(self.kv, torch.tensor(rows, device=dev), self._decode_groups(decoding), prefills)
        keep = torch.tensor(sample_at if sample_at else [len(ids) - 1], device=dev)
        out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([positions], device=dev),
                         logits_to_keep=keep, use_cache=False, **{LAYOUT_KWARG: layout})
        logits = out.logits[0].float()  # [k, vocab]
        return logits if sample_at else logits[:0]

    def _decode_groups(self, decoding: list[tuple[int, Sequence, int]]) -> list[DecodeGroup]:
        """Decoding requests, shortest first, in groups whose lengths are within GROUP_SPREAD of each other."""
        dev = self.device
        ordered = sorted(((_page_list(seq), start, last) for start, seq, last in decoding),
                         key=lambda item: len(item[0].pages))
        groups: list[DecodeGroup] = []
        i = 0
        while i < len(ordered):
            limit = GROUP_SPREAD * len(ordered[i][0].pages)
            j = i
            while j < len(ordered) and len(ordered[j][0].pages) <= limit:
                j += 1
            members = ordered[i:j]
            pages, held = page_views([m[0] for m in members], dev)
            groups.append(DecodeGroup(torch.tensor([m[1] for m in members], device=dev), pages, held,
                                      torch.tensor([m[2] for m in members], device=dev)))
            i = j
        return groups


def _page_list(seq: Sequence) -> PageList:
    prefix = seq.prefix
    if prefix is None:
        return PageList(seq.pages)
    return PageList(prefix.pages + seq.pages, len(prefix.pages), prefix.positions)


def _row_list(pages: list[int], first: int, n: int) -> list[int]:
    """KV rows of own positions first..first+n-1 (counted after the prefix) in `pages`."""
    return [pages[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(first, first + n)]


def _rows(pages: list[int], first: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_row_list(pages, first, n), device=device)
