"""The attention function promptswap plugs into transformers, and the layout of one step.

A step packs every scheduled token of every request into one row `[1, T]` (no padding). The
model computes queries, keys and values as usual (rotary or learned positions from our per-token
`position_ids`), then calls `promptswap_attention` for each layer. That function stores the new
keys/values in their requests' KV pages and attends each request's queries to its pages, gathered
in order: its task prefix's shared pages (virtual tokens) first, then its own (text and generated
tokens). So every kind of request (soft prompt, prefix, none) goes through this one path.

Requests decoding together whose histories begin with the same pages (a task's prefix, a system prompt found in
the prefix cache, the prompt of n samples) read those pages once for all of them: cascade attention
(`SharedDecode`, the runner decides who), each part's softmax merged with the other's by their log-sum-exp.

A gathered row need not be the position it holds: the prefix's last page may be part full. Each
view therefore carries `positions`, the position every gathered row holds (-1 where none), and the
masks are written in positions, so causality and sliding windows mean what they mean in the model.

The runner names the step's layout with `StepLayout.active()`; the model's attention layers reach it through
one opaque op, `torch.ops.promptswap.attend`, so a compiled forward pass (server/engine/compiled.py) holds the
attention as a single call whose inputs are tensors, and never traces the layout's Python. Without a
`promptswap_layout` keyword (e.g. a plain `model(ids)` call) attention falls back to sdpa.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.kv import PagedKV, write_rows
from server.engine.pages import NULL_PAGE, PAGE_SIZE

ATTN_IMPLEMENTATION = "promptswap"
# In the model call of a step: True (attention goes through the step's layout and the opaque op), or the step's
# only query as tensors (`StepLayout.one_query`: the one-row graph, which traces its attention).
LAYOUT_KWARG = "promptswap_layout"


@dataclass(frozen=True, slots=True)
class Segment:
    """Pages holding consecutive positions: the first row holds `first`; only the first `count` rows hold
    one (None: every row of the pages, the rest masked by causality)."""

    pages: list[int]
    first: int = 0
    count: int | None = None


@dataclass(frozen=True, slots=True)
class PageList:
    """One request's pages in reading order, segment by segment: its task prefix's shared pages (the
    virtual positions), its own, and for a choice being scored the text's pages before the choice's own."""

    segments: tuple[Segment, ...]

    @classmethod
    def of(cls, own: list[int], prefix: list[int] | None = None, virtual: int = 0) -> PageList:
        """The usual request: a prefix holding `virtual` positions (if any), then its own pages."""
        if not prefix:
            return cls((Segment(own),))
        return cls((Segment(prefix, 0, virtual), Segment(own, virtual)))

    @property
    def pages(self) -> list[int]:
        return [page for segment in self.segments for page in segment.pages]


def page_views(requests: Seq[PageList], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages `[R, P]`, positions `[R, P * PAGE_SIZE]`) for requests read together, padded with the null
    page (always zero; its rows hold position -1 there: no query sees them)."""
    width = max(len(r.pages) for r in requests)
    most = max(len(r.segments) for r in requests)
    pages = torch.tensor([r.pages + [NULL_PAGE] * (width - len(r.pages)) for r in requests], dtype=torch.long)
    starts, firsts, counts, ends = [], [], [], []
    for r in requests:
        row = 0
        seg_starts, seg_firsts, seg_counts = [], [], []
        for seg in r.segments:
            rows = len(seg.pages) * PAGE_SIZE
            seg_starts.append(row)
            seg_firsts.append(seg.first)
            seg_counts.append(rows if seg.count is None else seg.count)
            row += rows
        pad = most - len(r.segments)  # never selected: their start is past every row
        starts.append(seg_starts + [1 << 40] * pad)
        firsts.append(seg_firsts + [0] * pad)
        counts.append(seg_counts + [0] * pad)
        ends.append(row)
    row = torch.arange(width * PAGE_SIZE)[None, :]  # [1, W]
    start_t = torch.tensor(starts)  # [R, S]
    segment = (row[:, :, None] >= start_t[:, None, :]).sum(-1) - 1  # [R, W] the segment each row is in
    offset = row - start_t.gather(1, segment)
    held = (offset < torch.tensor(counts).gather(1, segment)) & (row < torch.tensor(ends)[:, None])
    positions = torch.where(held, torch.tensor(firsts).gather(1, segment) + offset, -1)
    return pages.to(device), positions.to(device)


def _pad(rows: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """`rows` (1-D or 2-D) widened to `width` along the last dim with `value`."""
    return F.pad(rows, (0, width - rows.shape[-1]), value=value)


def _allowed(positions: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Query at position q sees the rows holding positions 0..q (within the window)."""
    allowed = (positions >= 0) & (positions <= query_positions)
    if window is not None:
        allowed &= positions > query_positions - window
    return allowed


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as an additive bias (0 or -inf), made once per step: sdpa would convert a boolean
    mask again in every layer. Every query sees at least its own position, so no row is all -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass(slots=True)
class PrefillChunk:
    """`n` new tokens of one request at packed offset `start`, the first at position `first`."""

    start: int
    n: int
    first: int
    pages: torch.Tensor  # [P] its pages in reading order
    positions: torch.Tensor  # [P * PAGE_SIZE]
    _masks: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> PrefillChunk:
        return PrefillChunk(self.start, self.n, self.first, self.pages.to(device), self.positions.to(device))

    def allowed(self, window: int | None) -> torch.Tensor:
        """`[n, rows]` bool: query i (position first+i) sees the rows holding positions <= first+i."""
        q = torch.arange(self.first, self.first + self.n, device=self.positions.device)[:, None]
        return _allowed(self.positions[None, :], q, window)

    def bias(self, window: int | None, dtype: torch.dtype, groups: int) -> torch.Tensor:
        """`[groups*n, rows]`: `allowed` as an additive bias, repeated for the query heads of a kv head."""
        key = (window, dtype, groups)
        if key not in self._masks:
            self._masks[key] = _bias(self.allowed(window), dtype).repeat(groups, 1)
        return self._masks[key]


@dataclass(slots=True)
class DecodeGroup:
    """Requests decoding one token each, read together: `[D, P]` pages, similar lengths."""

    token_idx: torch.Tensor  # [D] packed offsets of the decode tokens
    pages: torch.Tensor  # [D, P]
    positions: torch.Tensor  # [D, P * PAGE_SIZE]
    last: torch.Tensor  # [D] position of each request's new token
    _masks: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(self.token_idx.to(device), self.pages.to(device), self.positions.to(device),
                           self.last.to(device))

    def allowed(self, window: int | None) -> torch.Tensor:
        """`[D, rows]` bool: each request's new token sees its whole (windowed) history."""
        return _allowed(self.positions, self.last[:, None], window)

    def bias(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """`[D, 1, 1, rows]`: `allowed` as an additive bias."""
        key = (window, dtype)
        if key not in self._masks:
            self._masks[key] = _bias(self.allowed(window), dtype)[:, None, None, :]
        return self._masks[key]


@dataclass(slots=True)
class SharedDecode:
    """Requests decoding one token each, in clusters whose histories begin with the same pages holding the same
    positions (a task's prefix, a system prompt found in the prefix cache, the prompt of n samples). Cascade
    attention reads each cluster's shared pages once for all its requests, then each request's own pages (`tails`:
    the rest of its history, its new token included), and merges the two parts by their log-sum-exp: the softmax
    over the whole history, without reading the shared keys and values once per request. Every cluster of the step
    is computed at once (padded to the most pages and the most requests), so the cost in calls is one cascade's."""

    pages: torch.Tensor  # [C, S] each cluster's shared pages, padded with the null page
    positions: torch.Tensor  # [C, S * PAGE_SIZE] (-1: no position)
    slots: torch.Tensor  # [M] each request's place among the clusters': cluster * widest + its index in it
    widest: int  # the most requests in a cluster
    tails: DecodeGroup  # [M] the requests' tokens and positions, and their pages after the shared ones
    _masks: dict = field(default_factory=dict)  # what every layer reads, made once per step

    @classmethod
    def of(cls, clusters: Seq[tuple[torch.Tensor, torch.Tensor, int, list[int], list[int]]],
           device: torch.device) -> SharedDecode:
        """The step's clusters, each (its requests' `page_views`, pages `[R, P]` and positions; the pages they
        share, from the first; their tokens' packed offsets; their tokens' positions), padded and stacked."""
        widest = max(len(tokens) for *_, tokens, _ in clusters)
        shared = max(common for _, _, common, _, _ in clusters)
        tail = max(pages.shape[1] - common for pages, _, common, _, _ in clusters)
        pages: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        tails: list[torch.Tensor] = []
        tail_positions: list[torch.Tensor] = []
        slots: list[int] = []
        tokens: list[int] = []
        last: list[int] = []
        for c, (member_pages, held, common, member_tokens, member_last) in enumerate(clusters):
            pages.append(_pad(member_pages[0, :common], shared, NULL_PAGE))
            positions.append(_pad(held[0, :common * PAGE_SIZE], shared * PAGE_SIZE, -1))
            tails.append(_pad(member_pages[:, common:], tail, NULL_PAGE))
            tail_positions.append(_pad(held[:, common * PAGE_SIZE:], tail * PAGE_SIZE, -1))
            slots.extend(range(c * widest, c * widest + len(member_tokens)))
            tokens.extend(member_tokens)
            last.extend(member_last)
        group = DecodeGroup(torch.tensor(tokens, device=device), torch.cat(tails).to(device),
                            torch.cat(tail_positions).to(device), torch.tensor(last, device=device))
        return cls(torch.stack(pages).to(device), torch.stack(positions).to(device),
                   torch.tensor(slots, device=device), widest, group)

    def to(self, device: torch.device) -> SharedDecode:
        return SharedDecode(self.pages.to(device), self.positions.to(device), self.slots.to(device), self.widest,
                            self.tails.to(device))

    def allowed(self, window: int | None, groups: int) -> torch.Tensor:
        """`[C, 1, widest * groups, S * PAGE_SIZE]` bool: which shared rows each query head of each request's new
        token sees (an empty slot: none), its queries in the order of `_cascade`'s."""
        key = (window, groups)
        if key not in self._masks:
            clusters = self.pages.shape[0]
            last = self.tails.last.new_full((clusters * self.widest,), -1)
            last[self.slots] = self.tails.last
            allowed = _allowed(self.positions[:, None, :], last.view(clusters, self.widest, 1), window)
            self._masks[key] = allowed[:, None, :, None, :].expand(-1, -1, -1, groups, -1).flatten(2, 3)
        return self._masks[key]

    def bias(self, window: int | None, groups: int) -> torch.Tensor:
        """`allowed` as an additive bias (float32)."""
        key = ("bias", window, groups)
        if key not in self._masks:
            self._masks[key] = _bias(self.allowed(window, groups), torch.float32)
        return self._masks[key]

    def hidden(self, window: int | None, groups: int) -> torch.Tensor:
        """`[C, 1, widest * groups]`: the queries that see no shared row (the window hides them, an empty slot)."""
        key = ("hidden", window, groups)
        if key not in self._masks:
            self._masks[key] = ~self.allowed(window, groups).any(-1)
        return self._masks[key]

    @property
    def members(self) -> torch.Tensor:
        """`[C * widest]`: the request in each slot, M (one past the last) where the slot is empty."""
        if "members" not in self._masks:
            members = self.slots.new_full((self.pages.shape[0] * self.widest,), len(self.slots))
            members[self.slots] = torch.arange(len(self.slots), device=self.slots.device)
            self._masks["members"] = members
        return self._masks["members"]


@dataclass(slots=True)
class StepLayout:
    """Where each packed token's keys and values go, and what each query attends to, for one pass."""

    kv: PagedKV
    rows: torch.Tensor  # [T] KV row of each packed token (page * PAGE_SIZE + offset)
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    shared: SharedDecode | None = None
    _elsewhere: dict = field(default_factory=dict)  # device -> this layout's tensors there

    @contextmanager
    def active(self) -> Iterator[StepLayout]:
        """This layout is the one the attention op reads while the step's forward pass runs."""
        if _ACTIVE:
            raise RuntimeError("a step's layout is already active: steps do not nest")
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.clear()

    def one_query(self) -> dict[str, torch.Tensor]:
        """A step of one token as plain tensors, for the one-row graph, which traces its attention (`attend_one`):
        the pool's storage, the row the token's key and value go to, and the pages it reads."""
        assert self.rows.numel() == 1, "one_query: a step of one token"
        if self.decodes:
            d = self.decodes[0]
            pages, positions, last = d.pages, d.positions, d.last
        else:  # a one-token chunk (a choice scored) reads as a decode does
            c = self.prefills[0]
            pages, positions, last = c.pages[None], c.positions[None], self.rows.new_tensor([c.first])
        keys, values = self.kv.flat_layers()
        return {"keys": keys, "values": values, "rows": self.rows, "pages": pages, "positions": positions,
                "last": last}

    def on(self, device: torch.device) -> StepLayout:
        """This layout with its tensors on `device`: a model split over devices runs each layer on its own."""
        if device == self.rows.device:
            return self
        if device not in self._elsewhere:
            self._elsewhere[device] = StepLayout(self.kv, self.rows.to(device), [d.to(device) for d in self.decodes],
                                                 [c.to(device) for c in self.prefills],
                                                 self.shared.to(device) if self.shared is not None else None)
        return self._elsewhere[device]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
        # query [1, heads, T, hd]; key/value [1, kv_heads, T, hd]
        if query.device != self.rows.device:
            return self.on(query.device).attend(layer, query, key, value, scaling, window, softcap)
        _, heads, total, hd = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        self.kv.write(layer, key[0], value[0], self.rows)
        q = query[0]  # [heads, T, hd]
        out = query.new_empty(total, heads, hd)
        for d in self.decodes:
            # Query heads of one kv head become its query rows: GQA without repeating keys.
            qd = q[:, d.token_idx].transpose(0, 1).reshape(-1, kv_heads, groups, hd)
            if _in_place_from is not None and d.positions.numel() >= _in_place_from:  # compiled: pages where they lie
                key_pages, value_pages = self.kv.layer(layer)
                o = _attend_in_place(qd.contiguous(), key_pages, value_pages, d.pages, d.positions, d.last,
                                     _scale(scaling, hd), window, softcap)
            else:
                keys, values = self.kv.gather(layer, d.pages)  # [D, kv_heads, rows, hd]
                o = _attend(qd, keys, values, d.bias(window, q.dtype), scaling, softcap)  # [D, kv_heads, groups, hd]
            out[d.token_idx] = o.reshape(-1, heads, hd)
        if self.shared is not None:
            s = self.shared
            qs = q[:, s.tails.token_idx].transpose(0, 1).reshape(-1, kv_heads, groups, hd)
            out[s.tails.token_idx] = _cascade(self.kv, layer, qs, s, _scale(scaling, hd), window,
                                              softcap).reshape(-1, heads, hd)
        for c in self.prefills:
            keys, values = self.kv.gather(layer, c.pages)  # [kv_heads, rows, hd]
            qc = q[:, c.start:c.start + c.n].reshape(kv_heads, groups * c.n, hd)
            o = _attend(qc, keys, values, c.bias(window, q.dtype, groups), scaling, softcap)  # [kv_heads, groups*n, hd]
            out[c.start:c.start + c.n] = o.view(kv_heads, groups, c.n, hd).permute(2, 0, 1, 3).reshape(
                c.n, heads, hd)
        return out.unsqueeze(0)  # [1, T, heads, hd], the layout attention functions return


def _cascade(kv: PagedKV, layer: int, q: torch.Tensor, shared: SharedDecode, scale: float, window: int | None,
             softcap: float | None) -> torch.Tensor:
    """Cascade attention (`SharedDecode`): q `[M, kv_heads, groups, hd]` over its cluster's shared pages, read once
    for every query of the cluster, then over its tail; the two softmaxes merged by their log-sum-exp.
    Out `[M, kv_heads, groups, hd]`."""
    _, kv_heads, groups, hd = q.shape
    clusters, widest = shared.pages.shape[0], shared.widest
    padded = torch.cat([q, q.new_zeros(1, kv_heads, groups, hd)]).index_select(0, shared.members)  # empty slots: 0
    padded = padded.view(clusters, widest, kv_heads, groups, hd).transpose(1, 2).reshape(clusters, kv_heads, -1, hd)
    keys, values = kv.gather(layer, shared.pages)  # [C, kv_heads, S, hd]; the buffer is reused by the next gather
    out, lse = _attend_lse(padded, keys, values, shared.bias(window, groups), scale, softcap)
    lse = lse.masked_fill(shared.hidden(window, groups), float("-inf"))  # a part the window hides
    out_shared = out.view(clusters, kv_heads, widest, groups, hd).transpose(1, 2).reshape(-1, kv_heads, groups, hd)
    lse_shared = lse.view(clusters, kv_heads, widest, groups).transpose(1, 2).reshape(-1, kv_heads, groups)
    keys, values = kv.gather(layer, shared.tails.pages)  # [M, kv_heads, T, hd]
    out_tail, lse_tail = _attend_lse(q, keys, values, shared.tails.bias(window, torch.float32), scale, softcap)
    # Each part's share of the whole softmax: exp(lse_part) / (exp(lse_shared) + exp(lse_tail)). The tail always
    # holds the new token, so lse_tail is finite; a shared part the window hides has lse -inf and weight 0.
    shared_share = torch.sigmoid(lse_shared[shared.slots] - lse_tail)[..., None].to(q.dtype)
    return out_tail + shared_share * (out_shared[shared.slots] - out_tail)


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp: q `[B, kv_heads, L, hd]`, k/v `[B, kv_heads, R, hd]` (strided as gathered),
    bias `[B, 1, L or 1, R]`; out `[B, kv_heads, L, hd]`, lse `[B, kv_heads, L]` (float32). On the CPU without a
    softcap, torch's flash kernel, which reads k and v in their strides and returns both. Rows that see nothing
    give out 0 (lse: 0 from the kernel, -inf here: the caller masks them)."""
    if softcap is None and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return torch.matmul(weights.to(v.dtype), v), lse


def _scale(scaling: float | None, head_dim: int) -> float:
    """The model's attention scale, or the usual 1/sqrt(head_dim) where it gives none (as sdpa does)."""
    return scaling if scaling is not None else head_dim ** -0.5


def _decode_in_place(q: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, pages: torch.Tensor,
                     positions: torch.Tensor, last: torch.Tensor, scale: float, window: int | None,
                     softcap: float | None) -> torch.Tensor:
    """One new token per request against its pages, read from the pool by index: q `[D, kv_heads, groups, hd]`,
    pages `[D, P]`, positions `[D, P * PAGE_SIZE]` (-1: no position), last `[D]`; out `[D, kv_heads, groups, hd]`.
    Written as products and sums, not matrix products, so that compiled (`_attend_in_place`) each is one reduction
    loading the keys and values through the page table: no gathered copy. Eager, it would gather."""
    d, p = pages.shape
    _, page_size, kv_heads, hd = key_pages.shape
    keys = key_pages[pages].reshape(d, p * page_size, kv_heads, 1, hd)
    values = value_pages[pages].reshape(d, p * page_size, kv_heads, 1, hd)
    scores = (q[:, None].float() * keys.float()).sum(-1) * scale  # [D, rows, kv_heads, groups]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = _allowed(positions, last[:, None], window)  # [D, rows]
    scores = scores.masked_fill(~allowed[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return (weights[..., None] * values.float()).sum(1).to(q.dtype)


def attend_one(step: dict[str, torch.Tensor], layer: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
    """The attention of a step of one token (`StepLayout.one_query`), in torch ops the one-row graph traces: its key
    and value written into their page, then its pages read where they lie. query [1, heads, 1, hd]; key/value
    [1, kv_heads, 1, hd]; out [1, 1, heads, hd]. Traced, there is no opaque call and no Python per layer."""
    _, heads, _, hd = query.shape
    kv_heads = key.shape[1]
    keys, values = step["keys"][layer], step["values"][layer]  # [pages * PAGE_SIZE, kv_heads, hd]
    write_rows(keys, values, step["rows"], key[0], value[0])
    q = query[0].transpose(0, 1).reshape(1, kv_heads, heads // kv_heads, hd)
    paged = (-1, PAGE_SIZE, kv_heads, hd)
    out = _decode_in_place(q, keys.view(paged), values.view(paged), step["pages"], step["positions"], step["last"],
                           _scale(scaling, hd), window, softcap)
    return out.reshape(1, 1, heads, hd)


# Compiled once for every size: the number of requests and of pages may be anything, 1 included (one graph).
_attend_in_place_compiled = torch.compile(_decode_in_place, dynamic=True)


def _attend_in_place(q, key_pages, value_pages, pages, positions, last, scale, window, softcap):
    for tensor, dim in ((q, 0), (pages, 0), (pages, 1), (positions, 0), (positions, 1), (last, 0)):
        torch._dynamo.decorators.mark_unbacked(tensor, dim)
    return _attend_in_place_compiled(q, key_pages, value_pages, pages, positions, last, scale, window, softcap)


# Below this many rows in a decode group (requests x their pages' rows) a gathered copy and sdpa cost less than the
# compiled reader, whose generated reductions run slower than sdpa's kernel. Measured per layer (SmolLM2-135M's
# heads, float32, 2 threads, the two interleaved): 16 requests x 128 rows, gathered 0.73 ms, in place 1.12;
# 64 x 96, 1.77 against 6.05; 32 x 352, 7.0 against 7.4; 64 x 320, 11.7 against 11.4; 64 x 976, 36.6 against 32.4
# (one thread: the same crossing). It was 1,024 when the gather copied into a fresh padded tensor each layer.
IN_PLACE_MIN_ROWS = 16384

# While the compiled step runs (server/engine/compiled.py), decode groups of at least this many rows read the pages
# in place; None: the eager step, which keeps the gather and sdpa (eager, an indexed read is a copy anyway).
_in_place_from: int | None = None


@contextmanager
def in_place_attention(min_rows: int | None = None) -> Iterator[None]:
    """Decode attention reads the pages in place, for groups of `min_rows` rows or more (None: IN_PLACE_MIN_ROWS;
    0 at the warm-up: every group, so that the reader is compiled before anyone is served)."""
    global _in_place_from
    _in_place_from = IN_PLACE_MIN_ROWS if min_rows is None else min_rows
    try:
        yield
    finally:
        _in_place_from = None


def _attend(q, k, v, bias, scaling, softcap):
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    scale = _scale(scaling, q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap + bias
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


class UnsupportedAttention(RuntimeError):
    """The model asked for an attention feature promptswap does not implement."""


# The layout of the step running now (one engine thread runs steps, one at a time): a module-level list rather
# than an argument, so that the compiled graph passes tensors only.
_ACTIVE: list[StepLayout] = []


@torch.library.custom_op("promptswap::attend", mutates_args=())
def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float | None,
           window: int | None, softcap: float | None) -> torch.Tensor:
    """Write this layer's new keys and values into their pages and attend every query to its request's pages,
    as the active layout says. query [1, heads, T, hd]; key/value [1, kv_heads, T, hd]; out [1, T, heads, hd].
    Its KV writes are a side effect on the pool, which no other op of the graph reads, so no order is lost."""
    if not _ACTIVE:
        raise RuntimeError("promptswap.attend ran outside a step (no active StepLayout)")
    return _ACTIVE[0].attend(layer, query, key, value, scaling, window, softcap)


@attend.register_fake
def _(query, key, value, layer, scaling, window, softcap):
    _, heads, total, hd = query.shape
    return query.new_empty(1, total, heads, hd)


def active_layout() -> StepLayout:
    if not _ACTIVE:
        raise RuntimeError("no step is running (no active StepLayout)")
    return _ACTIVE[0]


def promptswap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    in_step = kwargs.pop(LAYOUT_KWARG, False)
    if not in_step:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedAttention(f"attention with {unsupported!r} is not supported by promptswap")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedAttention(f"{type(module).__name__} has no layer_idx; cannot map it to a KV layer")
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if isinstance(in_step, dict):  # the one-row graph (server/engine/compiled.py): its attention is traced
        return attend_one(in_step, layer, query, key, value, scaling, window, softcap), None
    out = torch.ops.promptswap.attend(query, key, value, layer, None if scaling is None else float(scaling),
                                      None if window is None else int(window),
                                      None if softcap is None else float(softcap))
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, promptswap_attention)
