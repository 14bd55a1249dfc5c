"""The attention function promptswap plugs into transformers, and the layout of one step.

A step packs every scheduled token of every request into one row `[1, T]` (no padding). The
model computes queries, keys and values as usual (rotary or learned positions from our per-token
`position_ids`), then calls `promptswap_attention` for each layer. That function scatters the
new keys/values into each request's KV slot and attends each request's queries to its own slot:
the task prefix (virtual tokens) sits at the slot's first positions, the text after it. So every
kind of request (soft prompt, prefix, none) goes through this one path.

Without a `promptswap_layout` keyword (e.g. a plain `model(ids)` call) it falls back to sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.kv import SlotKV

ATTN_IMPLEMENTATION = "promptswap"
LAYOUT_KWARG = "promptswap_layout"


@dataclass(slots=True)
class PrefillChunk:
    """`n` new tokens of one request at packed offset `start`, after `ctx` positions already in its slot."""

    start: int
    n: int
    slot: int
    ctx: int
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """`[n, ctx+n]` bool: query i (position ctx+i) sees keys j <= ctx+i (and within the window)."""
        if window not in self._masks:
            q_pos = torch.arange(self.ctx, self.ctx + self.n, device=device)[:, None]
            k_pos = torch.arange(self.ctx + self.n, device=device)[None, :]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            self._masks[window] = allowed
        return self._masks[window]


@dataclass(slots=True)
class DecodeGroup:
    """Requests decoding one token each, batched over the compact slot range 0..slots-1."""

    token_idx: torch.Tensor  # [D] packed offsets of the decode tokens
    slot_idx: torch.Tensor  # [D] their slots
    lengths: torch.Tensor  # [slots] positions in each slot after this step's write
    slots: int
    max_len: int
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """`[slots, 1, 1, max_len]` bool: each slot's last position sees its whole (windowed) history."""
        if window not in self._masks:
            k_pos = torch.arange(self.max_len, device=self.lengths.device)[None, :]
            last = (self.lengths - 1)[:, None]
            allowed = k_pos <= last
            if window is not None:
                allowed &= k_pos > last - window
            # A row that sees nothing would give NaN; let it see position 0 (its output is discarded).
            # Never force it for a live row: a sliding window may have moved past position 0.
            allowed[~allowed.any(dim=-1), 0] = True
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


@dataclass(slots=True)
class StepLayout:
    """Where each packed token goes and what it attends to, for one forward pass."""

    kv: SlotKV
    slot_idx: torch.Tensor  # [T] slot of each packed token
    pos_idx: torch.Tensor  # [T] position of each packed token inside its slot (= its position id)
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, window: int | None, softcap: float | None) -> torch.Tensor:
        # query [1, heads, T, hd]; key/value [1, kv_heads, T, hd]
        _, heads, total, hd = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        self.kv.write(layer, key[0], value[0], self.slot_idx, self.pos_idx)
        q = query[0]  # [heads, T, hd]
        out = query.new_empty(total, heads, hd)
        if self.decode is not None:
            d = self.decode
            keys, values = self.kv.layer_view(layer, d.slots, d.max_len)  # [S, kv_heads, L, hd]
            q_slots = q.new_zeros(d.slots, heads, hd)
            q_slots[d.slot_idx] = q[:, d.token_idx].transpose(0, 1)
            # Query heads of one kv head become its query rows: GQA without repeating keys.
            q_slots = q_slots.view(d.slots, kv_heads, groups, hd)
            o = _attend(q_slots, keys, values, d.mask(window), scaling, softcap)  # [S, kv_heads, groups, hd]
            out[d.token_idx] = o.reshape(d.slots, heads, hd)[d.slot_idx]
        for c in self.prefills:
            keys, values = self.kv.slot_view(layer, c.slot, c.ctx + c.n)  # [kv_heads, ctx+n, hd]
            qc = q[:, c.start:c.start + c.n].reshape(kv_heads, groups * c.n, hd)
            mask = c.mask(window, q.device).repeat(groups, 1)  # [groups*n, ctx+n]
            o = _attend(qc, keys, values, mask, scaling, softcap)  # [kv_heads, groups*n, hd]
            out[c.start:c.start + c.n] = o.view(kv_heads, groups, c.n, hd).permute(2, 0, 1, 3).reshape(
                c.n, heads, hd)
        return out.unsqueeze(0)  # [1, T, heads, hd], the layout attention functions return


def _attend(q, k, v, mask, scaling, softcap):
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


class UnsupportedAttention(RuntimeError):
    """The model asked for an attention feature promptswap does not implement."""


def promptswap_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layout: StepLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedAttention(f"attention with {unsupported!r} is not supported by promptswap")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedAttention(f"{type(module).__name__} has no layer_idx; cannot map it to a KV layer")
    out = layout.attend(layer, query, key, value, scaling, kwargs.get("sliding_window"), kwargs.get("softcap"))
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, promptswap_attention)
