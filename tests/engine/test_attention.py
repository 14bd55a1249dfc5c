"""The attention masks and the packed attention itself, against plain causal attention."""

import pytest
import torch
import torch.nn.functional as F

from server.engine.attention import (
    DecodeGroup,
    PageList,
    PrefillChunk,
    SharedDecode,
    StepLayout,
    _attend,
    _attend_in_place,
    page_views,
)
from server.engine.kv import PagedKV
from server.engine.pages import PAGE_SIZE


def one(pages, prefix_pages=0, virtual=0):
    return page_views([PageList.of(pages[prefix_pages:], pages[:prefix_pages], virtual)], torch.device("cpu"))


def test_gathered_rows_know_their_positions_across_a_part_full_prefix_page():
    # a 20-token prefix in pages 7, 3 (the second holds 4 positions), then the request's own page 5
    pages, positions = one([7, 3, 5], prefix_pages=2, virtual=20)
    assert pages.tolist() == [[7, 3, 5]]
    row = positions[0].tolist()
    assert row[:20] == list(range(20)) and row[20:32] == [-1] * 12  # the prefix page's empty rows
    assert row[32:] == list(range(20, 20 + PAGE_SIZE))


def test_prefill_mask_is_causal_in_positions():
    pages, positions = one([0])
    chunk = PrefillChunk(start=0, n=3, first=2, pages=pages[0], positions=positions[0])
    mask = chunk.allowed(None)[:, :5]
    expected = torch.tensor([[1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert not chunk.allowed(None)[:, 5:].any()


def test_prefill_mask_with_a_sliding_window_sees_only_the_last_positions():
    pages, positions = one([0])
    mask = PrefillChunk(start=0, n=2, first=4, pages=pages[0], positions=positions[0]).allowed(3)
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5]


def test_decode_mask_sees_each_requests_own_history():
    pages, positions = page_views([PageList.of([0]), PageList.of([2], [1], virtual=3)], torch.device("cpu"))
    group = DecodeGroup(torch.tensor([0, 1]), pages, positions, last=torch.tensor([2, 4]))
    mask = group.allowed(None)  # [requests, rows]
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]  # padded rows (its page 0 again) hidden
    assert mask[1].nonzero().flatten().tolist() == [0, 1, 2, PAGE_SIZE, PAGE_SIZE + 1]  # positions 0..4
    windowed = group.allowed(2)
    assert windowed[1].nonzero().flatten().tolist() == [PAGE_SIZE, PAGE_SIZE + 1]  # positions 3, 4


def test_packed_step_matches_causal_attention_per_request():
    torch.manual_seed(0)
    heads, kv_heads, hd = 4, 2, 8
    kv = PagedKV(1, kv_heads, hd, dtype=torch.float32, device=torch.device("cpu"), total_pages=8)
    kv.ensure(8)
    # request A: a 3-token prefix (page 6, shared) and 2 own positions cached (page 2); decodes position 5.
    # request B: no prefix, prefills 5 tokens into page 4.
    prefix_k, prefix_v = torch.randn(kv_heads, 3, hd), torch.randn(kv_heads, 3, hd)
    kv.write(0, prefix_k, prefix_v, torch.arange(6 * PAGE_SIZE, 6 * PAGE_SIZE + 3))
    own_k, own_v = torch.randn(kv_heads, 2, hd), torch.randn(kv_heads, 2, hd)
    kv.write(0, own_k, own_v, torch.arange(2 * PAGE_SIZE, 2 * PAGE_SIZE + 2))
    total = 6  # packed tokens: A's one, then B's five
    q, k, v = torch.randn(1, heads, total, hd), torch.randn(1, kv_heads, total, hd), torch.randn(1, kv_heads, total, hd)
    a_pages, a_positions = one([6, 2], prefix_pages=1, virtual=3)
    b_pages, b_positions = one([4])
    decode = DecodeGroup(torch.tensor([0]), a_pages, a_positions, last=torch.tensor([5]))
    rows = torch.tensor([2 * PAGE_SIZE + 2, *range(4 * PAGE_SIZE, 4 * PAGE_SIZE + 5)])
    layout = StepLayout(kv, rows, [decode], [PrefillChunk(1, 5, 0, b_pages[0], b_positions[0])])
    out = layout.attend(0, q, k, v, scaling=None, window=None, softcap=None)[0]  # [T, heads, hd]

    def reference(query, keys, values):  # plain causal attention of one request, keys repeated per group
        keys, values = keys.repeat_interleave(heads // kv_heads, 0), values.repeat_interleave(heads // kv_heads, 0)
        n, m = query.shape[1], keys.shape[1]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask).transpose(0, 1)

    a_keys = torch.cat([prefix_k, own_k, k[0, :, :1]], dim=1)
    a_values = torch.cat([prefix_v, own_v, v[0, :, :1]], dim=1)
    assert torch.allclose(out[:1], reference(q[0, :, :1], a_keys, a_values), atol=1e-5)
    assert torch.allclose(out[1:], reference(q[0, :, 1:], k[0, :, 1:], v[0, :, 1:]), atol=1e-5)


@pytest.mark.slow  # compiles the reader: seconds
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 20.0), (5, 30.0)])
def test_decode_reading_pages_in_place_equals_the_gathered_attention(window, softcap):
    """The compiled step's decode reader (pages read through the page table) against gather + attention."""
    g = torch.Generator().manual_seed(3)
    kv_heads, groups, hd, total = 2, 3, 16, 12
    kv = PagedKV(1, kv_heads, hd, dtype=torch.float32, device=torch.device("cpu"), total_pages=total)
    kv.ensure(total)
    rows = torch.arange(PAGE_SIZE, total * PAGE_SIZE)  # every page but the null page
    kv.write(0, torch.randn(kv_heads, len(rows), hd, generator=g), torch.randn(kv_heads, len(rows), hd, generator=g),
             rows)
    requests = [PageList.of([4, 9], [2], virtual=5), PageList.of([7]), PageList.of([1, 3, 11])]
    pages, positions = page_views(requests, torch.device("cpu"))
    last = torch.tensor([5 + 2 * PAGE_SIZE - 3, 9, 3 * PAGE_SIZE - 1])
    q = torch.randn(len(requests), kv_heads, groups, hd, generator=g)
    group = DecodeGroup(torch.arange(len(requests)), pages, positions, last)
    keys, values = kv.gather(0, pages)
    expected = _attend(q, keys, values, group.bias(window, q.dtype), None, softcap)
    key_pages, value_pages = kv.layer(0)
    got = _attend_in_place(q, key_pages, value_pages, pages, positions, last, hd ** -0.5, window, softcap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(None, None), (9, None), (None, 20.0), (40, 30.0)])
def test_cascade_over_shared_pages_equals_each_request_reading_its_whole_history(window, softcap):
    """Cascade attention (each cluster's shared pages read once, each request's tail after, merged by log-sum-exp)
    against every request gathering its whole history. Two clusters, padded to each other: three requests sharing a
    task prefix with a part-full page and a cached text page, tails of different lengths; two sharing one page. A
    window of 9 hides the shared part from some requests, not all."""
    g = torch.Generator().manual_seed(5)
    kv_heads, groups, hd, total = 2, 3, 16, 16
    kv = PagedKV(1, kv_heads, hd, dtype=torch.float32, device=torch.device("cpu"), total_pages=total)
    kv.ensure(total)
    rows = torch.arange(PAGE_SIZE, total * PAGE_SIZE)
    kv.write(0, torch.randn(kv_heads, len(rows), hd, generator=g), torch.randn(kv_heads, len(rows), hd, generator=g),
             rows)
    virtual = 20  # cluster A: prefix pages 2, 6 (6 holds 4 positions), page 5 shared; then each its own
    a = [PageList.of([5, 4, 9], [2, 6], virtual), PageList.of([5, 7], [2, 6], virtual),
         PageList.of([5, 1, 3, 11], [2, 6], virtual)]
    a_last = [virtual + 2 * PAGE_SIZE + 3, virtual + PAGE_SIZE + 1, virtual + 3 * PAGE_SIZE + 7]
    b = [PageList.of([12, 13]), PageList.of([12, 14, 15])]  # cluster B: page 12 shared, no task
    b_last = [PAGE_SIZE + 5, 2 * PAGE_SIZE + 9]
    clusters = []
    for members, common, last, tokens in ((a, 3, a_last, [0, 1, 2]), (b, 1, b_last, [3, 4])):
        pages, positions = page_views(members, torch.device("cpu"))
        clusters.append((pages, positions, common, tokens, last))
    cascade = SharedDecode.of(clusters, torch.device("cpu"))
    requests = a + b
    pages, positions = page_views(requests, torch.device("cpu"))
    q = torch.randn(len(requests), kv_heads, groups, hd, generator=g)
    heads = kv_heads * groups
    whole = DecodeGroup(torch.arange(len(requests)), pages, positions, torch.tensor(a_last + b_last))
    keys, values = kv.gather(0, pages)
    expected = _attend(q, keys, values, whole.bias(window, q.dtype), None, softcap)
    layout = StepLayout(kv, torch.empty(0, dtype=torch.long), [], [], cascade)
    query = q.reshape(len(requests), heads, hd).transpose(0, 1)[None]  # [1, heads, T, hd], as the model gives it
    no_new = torch.empty(1, kv_heads, 0, hd)  # the new tokens' keys are in the pool already
    got = layout.attend(0, query, no_new, no_new, None, window, softcap)[0]  # [T, heads, hd]
    torch.testing.assert_close(got, expected.reshape(len(requests), heads, hd), rtol=1e-5, atol=1e-5)
