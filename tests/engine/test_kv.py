"""The KV pool's storage alone: pages written and gathered in order, growth keeps data, idle memory returns."""

import torch

from server.engine.kv import PagedKV
from server.engine.pages import PAGE_SIZE

LAYERS, HEADS, HD = 2, 2, 4


def store(total_pages: int = 64, **kw) -> PagedKV:
    return PagedKV(LAYERS, HEADS, HD, dtype=torch.float32, device=torch.device("cpu"), total_pages=total_pages, **kw)


def rows_of(page: int) -> torch.Tensor:
    return torch.arange(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)


def fill(kv: PagedKV, page: int, value: float) -> None:
    for layer in range(LAYERS):
        kv.write(layer, torch.full((HEADS, PAGE_SIZE, HD), value + layer), torch.full((HEADS, PAGE_SIZE, HD), -value),
                 rows_of(page))


def test_a_page_costs_its_positions_of_every_layer():
    kv = store()
    assert kv.bytes_per_position == 2 * LAYERS * HEADS * HD * 4  # keys and values, float32
    assert kv.page_bytes == PAGE_SIZE * kv.bytes_per_position
    assert kv.nbytes == 0  # nothing up front on the CPU


def test_gather_reads_pages_in_the_order_given_and_growth_keeps_them():
    kv = store()
    kv.ensure(3)
    fill(kv, 2, 5.0)
    fill(kv, 0, 1.0)
    kv.ensure(20)  # grows: what was stored survives
    assert kv.capacity == 20  # committed as used: the rest of the 64 pages is only reserved
    fill(kv, 19, 9.0)
    keys, values = kv.gather(1, torch.tensor([[19, 0], [2, 2]]))  # [2 requests, heads, 2 pages' rows, hd]
    assert keys.shape == (2, HEADS, 2 * PAGE_SIZE, HD)
    assert keys[0, :, :PAGE_SIZE].eq(10.0).all() and keys[0, :, PAGE_SIZE:].eq(2.0).all()
    assert keys[1].eq(6.0).all() and values[1].eq(-5.0).all()


def test_storage_shrinks_when_mostly_unused_and_is_released_when_empty():
    kv = store()
    kv.ensure(40)
    fill(kv, 1, 3.0)
    kv.shrink(11)  # not worth it: the pages in use are more than a quarter of those touched
    assert kv.capacity == 40
    kv.shrink(2)  # pages 0..1 in use: the storage holds what they need, and their contents
    assert kv.capacity == 2
    assert kv.gather(0, torch.tensor([1]))[0].eq(3.0).all()
    kv.shrink(0)
    assert kv.nbytes == 0 and not kv.allocated


def test_without_growth_the_whole_pool_is_allocated_at_first_use():
    kv = store(total_pages=10, grow=False)  # what CUDA does: no growth copy with two storages at once
    kv.ensure(1)
    assert kv.capacity == 10
    kv.shrink(0)
    assert kv.capacity == 10
