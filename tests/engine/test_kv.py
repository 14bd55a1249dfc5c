"""The KV store alone: slots stay compact, data survives growth and moves, the budget holds, memory returns."""

import pytest
import torch

from server.engine.kv import SlotKV
from server.engine.kv_budget import SlotBudget, slot_shape
from server.engine.sequence import SamplingParams, Sequence

LAYERS, HEADS, HD = 2, 2, 4


def request(prompt_len: int, max_new: int = 4, virtual: int = 0) -> Sequence:
    return Sequence(prompt_ids=list(range(prompt_len)), params=SamplingParams(max_new_tokens=max_new),
                    num_virtual=virtual)


def store(**kw) -> SlotKV:
    return SlotKV(LAYERS, HEADS, HD, dtype=torch.float32, device=torch.device("cpu"), **kw)


def fill(kv: SlotKV, seq: Sequence, value: float) -> None:
    """Write `value` at every position the request has computed, in every layer."""
    n = seq.num_virtual + seq.num_cached
    kv.load_prefix(seq.slot, torch.full((LAYERS, HEADS, n, HD), value), torch.full((LAYERS, HEADS, n, HD), -value))


def test_the_sizing_rule_is_slots_times_the_longest():
    seqs = [request(3, 4), request(10, 2, virtual=5), request(1, 1)]
    assert slot_shape(seqs) == (3, 17)
    assert SlotBudget(51).admits(seqs) and not SlotBudget(50).admits(seqs)
    assert slot_shape([]) == (0, 0)


def test_a_bytes_budget_counts_positions_of_all_layers():
    kv = store(budget_bytes=1000)
    assert kv.bytes_per_position == 2 * LAYERS * HEADS * HD * 4  # keys and values, float32
    assert kv.budget == SlotBudget(1000 // kv.bytes_per_position)


def test_assign_grows_and_keeps_what_is_stored():
    kv = store()
    a = request(3)
    kv.assign(a)
    a.num_cached = 3
    fill(kv, a, 1.0)
    b = request(40)  # longer: every slot grows to its length
    kv.assign(b)
    assert (a.slot, b.slot) == (0, 1) and kv.capacity >= 44 and kv.slots >= 2
    keys, values = kv.slot_all_layers(a.slot, 3)
    assert torch.equal(keys, torch.ones_like(keys)) and torch.equal(values, -torch.ones_like(values))


def test_free_moves_the_last_slot_into_the_hole_with_its_data():
    kv = store()
    seqs = [request(2) for _ in range(3)]
    for i, s in enumerate(seqs):
        kv.assign(s)
        s.num_cached = 2
        fill(kv, s, float(i + 1))
    kv.free(seqs[0])
    assert seqs[0].slot is None and (seqs[2].slot, seqs[1].slot) == (0, 1)
    assert kv.holders == [seqs[2], seqs[1]]
    keys, _ = kv.slot_all_layers(0, 2)
    assert torch.equal(keys, torch.full_like(keys, 3.0))  # request 2's data followed it to slot 0
    kv.free(seqs[1])
    kv.free(seqs[2])
    assert kv.nbytes == 0 and kv.keys is None  # nothing runs: memory is given back


def test_growth_stays_within_the_budget():
    kv = store(budget_bytes=store().bytes_per_position * 100)
    seqs = [request(20, 5) for _ in range(4)]  # 4 slots x 25 positions = the whole budget
    for s in seqs:
        kv.assign(s)
    assert kv.slots * kv.capacity <= 100
    assert kv.nbytes <= 100 * kv.bytes_per_position


def test_reserve_sizes_for_the_queue_when_it_fits_and_for_this_step_when_not():
    roomy = store(budget_bytes=store().bytes_per_position * 10_000, max_slots=8)
    joining, queued = [request(5)], [request(30) for _ in range(3)]
    roomy.reserve(joining, queued)
    assert roomy.slots >= 4 and roomy.capacity >= 34
    tight = store(budget_bytes=store().bytes_per_position * 20, max_slots=8)
    tight.reserve(joining, queued)
    assert tight.slots * tight.capacity <= 20 and tight.capacity >= 9


def test_write_scatters_each_token_to_its_slot_and_position():
    kv = store()
    a, b = request(4), request(4)
    kv.assign(a)
    kv.assign(b)
    key = torch.arange(HEADS * 3 * HD, dtype=torch.float32).view(HEADS, 3, HD)
    kv.write(1, key, -key, torch.tensor([a.slot, b.slot, b.slot]), torch.tensor([0, 2, 3]))
    keys, values = kv.layer_view(1, 2, 4)  # [slots, heads, positions, hd]
    assert torch.equal(keys[a.slot, :, 0], key[:, 0]) and torch.equal(keys[b.slot, :, 3], key[:, 2])
    assert torch.equal(values[b.slot, :, 2], -key[:, 1])
    assert keys[a.slot, :, 1:].abs().sum() == 0  # nothing else was touched


@pytest.mark.parametrize("positions", [0, -5])
def test_a_budget_must_be_positive(positions):
    with pytest.raises(ValueError, match="kv_budget_positions"):
        SlotBudget(positions)
