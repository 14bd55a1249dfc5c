"""The attention masks and the packed attention itself, against plain causal attention."""

import torch
import torch.nn.functional as F

from server.engine.attention import DecodeGroup, PrefillChunk, StepLayout
from server.engine.kv import SlotKV


def test_prefill_mask_is_causal_after_the_context():
    chunk = PrefillChunk(start=0, n=3, slot=0, ctx=2)
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(chunk.mask(None, torch.device("cpu")), expected)


def test_prefill_mask_with_a_sliding_window_sees_only_the_last_positions():
    mask = PrefillChunk(start=0, n=2, slot=0, ctx=4).mask(3, torch.device("cpu"))  # query positions 4 and 5
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5]


def test_decode_mask_sees_each_slots_own_history():
    group = DecodeGroup(torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([3, 1, 5]), slots=3, max_len=5)
    mask = group.mask(None)[:, 0, 0]  # [slots, max_len]
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, False, False, False, False],
                             [True, True, True, True, True]]
    windowed = group.mask(2)[:, 0, 0]
    assert windowed[2].nonzero().flatten().tolist() == [3, 4]  # position 0 is NOT forced in for a live row
    assert windowed[0].nonzero().flatten().tolist() == [1, 2]


def test_decode_mask_lets_an_empty_row_see_position_zero_only():
    group = DecodeGroup(torch.tensor([0]), torch.tensor([0]), torch.tensor([2, 0]), slots=2, max_len=2)
    assert group.mask(None)[1, 0, 0].tolist() == [True, False]  # no NaN from a row that sees nothing


def test_packed_step_matches_causal_attention_per_request():
    torch.manual_seed(0)
    heads, kv_heads, hd = 4, 2, 8
    kv = SlotKV(1, kv_heads, hd, dtype=torch.float32, device=torch.device("cpu"))
    kv.ensure(2, 8)
    # request A: 3 positions already cached in slot 0, decodes its 4th; request B: prefills 5 in slot 1
    cached_k, cached_v = torch.randn(kv_heads, 3, hd), torch.randn(kv_heads, 3, hd)
    kv.write(0, cached_k, cached_v, torch.zeros(3, dtype=torch.long), torch.arange(3))
    total = 6  # packed tokens: A's one, then B's five
    q, k, v = torch.randn(1, heads, total, hd), torch.randn(1, kv_heads, total, hd), torch.randn(1, kv_heads, total, hd)
    decode = DecodeGroup(torch.tensor([0]), torch.tensor([0]), torch.tensor([4, 1]), slots=2, max_len=4)
    layout = StepLayout(kv, torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([3, 0, 1, 2, 3, 4]), decode,
                        [PrefillChunk(start=1, n=5, slot=1, ctx=0)])
    out = layout.attend(0, q, k, v, scaling=None, window=None, softcap=None)[0]  # [T, heads, hd]

    def reference(query, keys, values):  # plain causal attention of one request, keys repeated per group
        keys, values = keys.repeat_interleave(heads // kv_heads, 0), values.repeat_interleave(heads // kv_heads, 0)
        n, m = query.shape[1], keys.shape[1]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask).transpose(0, 1)

    a_keys = torch.cat([cached_k, k[0, :, :1]], dim=1)
    a_values = torch.cat([cached_v, v[0, :, :1]], dim=1)
    assert torch.allclose(out[:1], reference(q[0, :, :1], a_keys, a_values), atol=1e-5)
    assert torch.allclose(out[1:], reference(q[0, :, 1:], k[0, :, 1:], v[0, :, 1:]), atol=1e-5)
