"""The model runner: owns the model and the KV pool's storage; computes task prefixes; runs one step.

Batching and page decisions live in the scheduler (and `pages.py`), request state in `Sequence`;
the runner turns a list of `(sequence, n_tokens)` into one forward pass and returns the logits of
the requests that pick a token this step.
"""

from __future__ import annotations

import torch

from server.engine.attention import (
    LAYOUT_KWARG,
    DecodeGroup,
    PageList,
    PrefillChunk,
    Segment,
    StepLayout,
    page_views,
)
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
        self.kv = PagedKV(g.num_layers, g.num_kv_heads, g.head_dim, dtype=base.dtype,
                          devices=base.devices_of_layers(), total_pages=total_pages)

    # -- task prefixes -------------------------------------------------------------------------

    @staticmethod
    def is_computed(entry: SharedPrefix) -> bool:
        """A soft prompt's keys and values come out of a forward pass; a prefix table is them already."""
        return entry.source.kind != "prefix"

    @torch.inference_mode()
    def write_prefix(self, entry: SharedPrefix) -> None:
        """Fill a prefix-tuning task's pages with its keys and values, split per layer (PEFT's layout)."""
        g = self.base.geometry
        emb = entry.source.embeddings.to(device=self.device, dtype=self.base.dtype)
        keys, values = g.split_prefix(emb)  # [layers, kv_heads, n, head_dim]
        rows = _rows(entry.pages, 0, emb.shape[0], self.device)
        for layer in range(g.num_layers):
            self.kv.write(layer, keys[layer], values[layer], rows)

    def compute_prefix(self, entry: SharedPrefix) -> None:
        """Fill a new shared prefix's pages with its task's keys and values, for every layer."""
        if self.is_computed(entry):
            self.run([], [entry])
        else:
            self.write_prefix(entry)

    # -- storage -------------------------------------------------------------------------------

    def fit_storage(self, pages_handed_out: int, *, idle: bool = False) -> None:
        """Let the storage follow the pool: usable up to every page handed out; when nothing runs,
        give back what lies beyond the pages still held (cached task prefixes)."""
        if idle:
            self.kv.shrink(pages_handed_out)
        else:
            self.kv.ensure(pages_handed_out)

    def clear_pages(self, pages: list[int]) -> None:
        """Zero pages just handed out: their rows past what the new owner writes are read, masked."""
        if pages:
            self.kv.clear(torch.tensor(pages, device=self.device))

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: Batch, prefixes: list[SharedPrefix] | tuple[()] = ()) -> torch.Tensor:
        """Compute `n` new tokens of each sequence in one pass; return float32 logits `[k, vocab]`
        for the k sequences whose last token was computed (they sample next), in batch order.

        `prefixes` are soft-prompt task prefixes first used in this step: their virtual tokens go through
        the same pass (positions 0..n-1, into their shared pages), packed first. In every layer all new
        keys and values are written before any query reads, so a request can read its prefix in the
        very pass that computes it."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        prefills: list[PrefillChunk] = []
        embeddings = []
        for entry in prefixes:
            emb = entry.source.embeddings.to(device=dev, dtype=self.base.dtype)
            n = emb.shape[0]
            pages, held = page_views([PageList.of(entry.pages)], dev)
            prefills.append(PrefillChunk(len(positions), n, 0, pages[0], held[0]))
            positions.extend(range(n))
            rows.extend(_row_list(entry.pages, 0, n))
            embeddings.append(emb)
        offset = len(positions)  # packed offset of the first text token
        decoding: list[tuple[int, Sequence, int]] = []  # (packed offset, request, position of its token)
        sample_at: list[int] = []  # packed offsets whose logits are returned, in batch order
        for seq, n in batch:
            if seq.computes_choices(n):
                sample_at.extend(self._add_choices(seq, offset + len(ids), ids, positions, rows, prefills))
                continue
            start = offset + len(ids)
            first = seq.num_virtual + seq.num_cached  # position of the first new token
            ids.extend(seq.all_ids[seq.num_cached:seq.num_cached + n])
            positions.extend(range(first, first + n))
            rows.extend(_row_list(seq.pages, seq.num_cached, n))
            if n == 1:
                decoding.append((start, seq, first))
            else:
                pages, held = page_views([_page_list(seq)], dev)
                prefills.append(PrefillChunk(start, n, first, pages[0], held[0]))
            kept = seq.rows_kept(n)  # the last `kept` tokens' logits (Sequence.rows_kept)
            sample_at.extend(range(start + n - kept, start + n))
        layout = StepLayout(self.kv, torch.tensor(rows, device=dev), self._decode_groups(decoding), prefills)
        # The rows to keep index the last layer's output: on a model spread over devices that is not where the
        # inputs are, and an index on the CPU serves every device.
        keep = torch.tensor(sample_at if sample_at else [len(positions) - 1],
                            device=dev if not self.base.layer_devices else "cpu")
        inputs = {"input_ids": torch.tensor([ids], device=dev)}
        if embeddings:  # the text's embeddings after the virtual tokens', as PEFT feeds a soft prompt
            text = self.model.get_input_embeddings()(inputs["input_ids"])[0] if ids else None
            inputs = {"inputs_embeds": torch.cat([*embeddings, *([text] if text is not None else [])])[None]}
        out = self.model(**inputs, position_ids=torch.tensor([positions], device=dev), logits_to_keep=keep,
                         use_cache=False, **{LAYOUT_KWARG: layout})
        logits = out.logits[0].float()  # [k, vocab]
        return logits if sample_at else logits[:0]

    def _add_choices(self, seq: Sequence, start: int, ids: list[int], positions: list[int], rows: list[int],
                     prefills: list[PrefillChunk]) -> list[int]:
        """Pack a scoring request's choices: each choice's tokens but its last, at the positions after the
        text, written to the choice's own pages, each reading the task prefix, the text's pages (computed
        once, shared by every choice) and its own. Returns the packed offsets of all those tokens: their
        logits score each choice's next token."""
        assert seq.choices is not None
        text = len(seq.prompt_ids)
        first = seq.num_virtual + text
        head = [Segment(seq.prefix.pages, 0, seq.prefix.positions)] if seq.prefix is not None else []
        kept: list[int] = []
        for (_, choice), pages in zip(seq.choices, seq.choice_pages, strict=True):
            m = len(choice) - 1
            if m == 0:
                continue  # a one-token choice was scored by the text's last logits alone
            plist = PageList((*head, Segment(seq.pages, seq.num_virtual, text), Segment(pages, first)))
            view_pages, held = page_views([plist], self.device)
            prefills.append(PrefillChunk(start + len(kept), m, first, view_pages[0], held[0]))
            ids.extend(choice[:-1])
            positions.extend(range(first, first + m))
            rows.extend(_row_list(pages, 0, m))
            kept.extend(range(start + len(kept), start + len(kept) + m))
        return kept

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
    return PageList.of(seq.pages, prefix.pages if prefix is not None else None,
                       prefix.positions if prefix is not None else 0)


def _row_list(pages: list[int], first: int, n: int) -> list[int]:
    """KV rows of own positions first..first+n-1 (counted after the prefix) in `pages`."""
    return [pages[i // PAGE_SIZE] * PAGE_SIZE + i % PAGE_SIZE for i in range(first, first + n)]


def _rows(pages: list[int], first: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(_row_list(pages, first, n), device=device)
