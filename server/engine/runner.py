"""The model runner: owns the model and the KV pool's storage; computes task prefixes; runs one step.

Batching and page decisions live in the scheduler (and `pages.py`), request state in `Sequence`;
the runner turns a list of `(sequence, n_tokens)` into one forward pass and returns a `StepOutput`:
the logits rows each request keeps (what happens to them is `logits.py`'s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.attention import (
    LAYOUT_KWARG,
    DecodeGroup,
    PageList,
    PrefillChunk,
    SharedDecode,
    StepLayout,
    page_views,
)
from server.engine.base_model import BaseModel
from server.engine.kv import PagedKV
from server.engine.kv_manager import StoragePlan
from server.engine.pages import PAGE_SIZE, SharedPrefix, row_list
from server.engine.scheduler import Batch
from server.engine.sequence import Sequence

# Decode requests are read in groups of similar length, so a short request never pays for the
# longest one's history: a group ends where a request holds more than this many times the first's pages.
GROUP_SPREAD = 2

# Decoding requests whose histories begin with the same pages read them once, together (cascade attention,
# attention.SharedDecode): a cluster of requests joins where reading its shared pages once saves at least
# CASCADE_MIN_SAVED_ROWS rows of keys and values a layer (its requests but one, times the shared rows), and the
# step runs a cascade where its clusters save CASCADE_MIN_STEP_ROWS in all. Below them the cascade's fixed cost
# (~0.25 ms a layer) is more than the rows it saves. Measured per layer on SmolLM2's heads (float32, 2 threads):
# 64 requests of 976 rows in 16 clusters sharing 864, 6.4 ms against 15 ms reading each in place; 4 requests of
# 544 rows in 2 clusters sharing 512, 0.56 ms against 0.42 ms gathered.
CASCADE_MIN_SAVED_ROWS = 256
CASCADE_MIN_STEP_ROWS = 2048

# A request decoding in a step: its pages in reading order, the packed offset of its token, the token's position.
Decoding = tuple[PageList, int, int]


@dataclass(frozen=True, slots=True)
class RequestRows:
    """One request of a step: the tokens computed for it and which logits rows are its own."""

    seq: Sequence
    n: int  # tokens computed for it in this step
    rows: slice  # its rows of StepOutput.logits (Sequence.rows_kept(n) of them)


@dataclass(frozen=True, slots=True)
class StepOutput:
    logits: torch.Tensor  # [k, vocab] float32: every request's kept rows, in batch order
    requests: list[RequestRows]

    @classmethod
    def join(cls, outputs: list[StepOutput], vocab: int) -> StepOutput:
        """Outputs of requests run apart, as if they had run in one pass."""
        requests, offset = [], 0
        for out in outputs:
            for r in out.requests:
                size = r.rows.stop - r.rows.start
                requests.append(RequestRows(r.seq, r.n, slice(offset, offset + size)))
                offset += size
        logits = torch.cat([o.logits for o in outputs]) if outputs else torch.empty(0, vocab)
        return cls(logits, requests)


class ModelRunner:
    def __init__(self, base: BaseModel, *, total_pages: int) -> None:
        self.base = base
        self.model = base.model
        self.forward = base.model  # how a step calls the model: the model itself, or its compiled graph (compiled.py)
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
        rows = torch.tensor(row_list(entry.pages, 0, emb.shape[0]), device=self.device)
        for layer in range(g.num_layers):
            self.kv.write(layer, keys[layer], values[layer], rows)

    def compute_prefix(self, entry: SharedPrefix) -> None:
        """Fill a new shared prefix's pages with its task's keys and values, for every layer."""
        if self.is_computed(entry):
            self.run([], [entry])
        else:
            self.write_prefix(entry)

    # -- storage -------------------------------------------------------------------------------

    def prepare(self, plan: StoragePlan) -> None:
        """Let the storage follow the pool before a step: usable up to every page handed out, the pages just
        handed out zeroed (their rows past what the new owner writes are read, masked); when nothing runs, give
        back what lies beyond the pages still held (cached task prefixes and pages)."""
        if plan.idle:
            self.kv.shrink(plan.extent)
            return
        self.kv.ensure(plan.extent)
        if plan.fresh:
            self.kv.clear(torch.tensor(plan.fresh, device=self.device))

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: Batch, prefixes: list[SharedPrefix] | tuple[()] = ()) -> StepOutput:
        """Compute `n` new tokens of each sequence in one pass; return the logits rows each keeps
        (`Sequence.rows_kept`), in batch order.

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
            rows.extend(row_list(entry.pages, 0, n))
            embeddings.append(emb)
        offset = len(positions)  # packed offset of the first text token
        decoding: list[Decoding] = []
        sample_at: list[int] = []  # packed offsets whose logits are returned, in batch order
        requests: list[RequestRows] = []
        for seq, n in batch:
            kept_before = len(sample_at)
            if seq.computes_choices(n):
                assert seq.scoring is not None
                sample_at.extend(seq.scoring.pack(seq, offset + len(ids), ids, positions, rows, prefills, dev))
            else:
                start = offset + len(ids)
                first = seq.num_virtual + seq.num_cached  # position of the first new token
                ids.extend(seq.all_ids[seq.num_cached:seq.num_cached + n])
                positions.extend(range(first, first + n))
                rows.extend(row_list(seq.pages, seq.num_cached, n))
                if n == 1:
                    decoding.append((_page_list(seq), start, first))
                else:
                    pages, held = page_views([_page_list(seq)], dev)
                    prefills.append(PrefillChunk(start, n, first, pages[0], held[0]))
                kept = seq.rows_kept(n)  # the last `kept` tokens' logits (Sequence.rows_kept)
                sample_at.extend(range(start + n - kept, start + n))
            requests.append(RequestRows(seq, n, slice(kept_before, len(sample_at))))
        shared, alone = self._shared_decodes(decoding)
        layout = StepLayout(self.kv, torch.tensor(rows, device=dev), self._decode_groups(alone), prefills, shared)
        # The rows to keep index the last layer's output: on a model spread over devices that is not where the
        # inputs are, and an index on the CPU serves every device.
        keep = torch.tensor(sample_at if sample_at else [len(positions) - 1],
                            device=dev if not self.base.layer_devices else "cpu")
        inputs = {"input_ids": torch.tensor([ids], device=dev)}
        if embeddings:  # the text's embeddings after the virtual tokens', as PEFT feeds a soft prompt
            text = self.model.get_input_embeddings()(inputs["input_ids"])[0] if ids else None
            inputs = {"inputs_embeds": torch.cat([*embeddings, *([text] if text is not None else [])])[None]}
        with layout.active():
            out = self.forward(**inputs, position_ids=torch.tensor([positions], device=dev), logits_to_keep=keep,
                             use_cache=False, **{LAYOUT_KWARG: True})
        logits = out.logits[0].float()  # [k, vocab]
        return StepOutput(logits if sample_at else logits[:0], requests)

    def _shared_decodes(self, decoding: list[Decoding]) -> tuple[SharedDecode | None, list[Decoding]]:
        """Decoding requests whose histories begin with the same pages holding the same positions, in clusters read
        by cascade attention (where a cluster saves CASCADE_MIN_SAVED_ROWS), and the rest."""
        by_first: dict[int, list[Decoding]] = {}
        for listed, start, last in decoding:
            by_first.setdefault(listed.pages[0], []).append((listed, start, last))
        clusters: list[tuple[list[Decoding], int, torch.Tensor, torch.Tensor]] = []
        alone: list[Decoding] = []
        for members in by_first.values():
            cluster = _cluster(members) if len(members) > 1 else None
            if cluster is None:
                alone.extend(members)
            else:
                clusters.append((members, *cluster))
        saved = sum((len(members) - 1) * common * PAGE_SIZE for members, common, _, _ in clusters)
        if saved < CASCADE_MIN_STEP_ROWS:
            return None, decoding
        return SharedDecode.of([(pages, held, common, [m[1] for m in members], [m[2] for m in members])
                                for members, common, pages, held in clusters], self.device), alone

    def _decode_groups(self, decoding: list[Decoding]) -> list[DecodeGroup]:
        """Decoding requests, shortest first, in groups whose lengths are within GROUP_SPREAD of each other."""
        dev = self.device
        ordered = sorted(decoding, key=lambda item: len(item[0].pages))
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


def _cluster(members: list[Decoding]) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(pages every member's history begins with, the members' pages and positions) where reading them once saves
    CASCADE_MIN_SAVED_ROWS; else None."""
    lists = [m[0].pages for m in members]
    common = 0  # each member keeps its last page (its new token's) to itself
    limit = min(len(pages) for pages in lists) - 1
    while common < limit and all(pages[common] == lists[0][common] for pages in lists):
        common += 1
    if (len(members) - 1) * common * PAGE_SIZE < CASCADE_MIN_SAVED_ROWS:
        return None
    pages, held = page_views([m[0] for m in members], torch.device("cpu"))
    rows = common * PAGE_SIZE
    if not bool((held[:, :rows] == held[:1, :rows]).all()):  # the same pages holding other positions: not shared
        return None
    return common, pages, held
