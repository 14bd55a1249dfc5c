"""The scheduler is plain Python: tested here without torch or a model."""

import subprocess
import sys

import pytest

from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import SamplingParams, Sequence, Status


def seq(prompt_len: int, max_new: int = 4, virtual: int = 0) -> Sequence:
    return Sequence(prompt_ids=list(range(prompt_len)), params=SamplingParams(max_new_tokens=max_new),
                    num_virtual=virtual)


def run_step(sched: Scheduler):
    """Pretend the runner computed the step: advance caches, append a token where one is sampled."""
    step = sched.schedule()
    for s, n in step.batch:
        sampled = s.num_cached + n == s.num_tokens
        s.num_cached += n
        if sampled:
            s.output_ids.append(7)
            if len(s.output_ids) >= s.params.max_new_tokens:
                sched.finish(s)
    return step


def test_request_state_and_scheduler_import_no_torch():
    code = "import sys, server.engine.scheduler, server.engine.sequence, server.engine.detokenizer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decodes_come_first_and_long_prompts_are_chunked():
    sched = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=16, kv_budget_positions=10_000))
    a = seq(3, max_new=10)
    sched.add(a)
    run_step(sched)  # a prefilled and sampled its first token
    long = seq(40)
    sched.add(long)
    step = sched.schedule()
    assert step.batch[0] == (a, 1)  # the running decode is never starved by the long prefill
    assert step.batch[1] == (long, 15)  # the rest of the step's budget goes to the new prompt
    assert step.admitted == [long]


def test_chunked_prefill_completes_and_then_decodes():
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=8, kv_budget_positions=10_000))
    s = seq(20, max_new=2)
    sched.add(s)
    sizes = []
    while not s.finished:
        step = run_step(sched)
        sizes.append(step.batch[0][1])
    assert sizes == [8, 8, 4, 1]  # three prefill chunks, then one decode
    assert s.output_ids == [7, 7]


def test_max_running_and_fifo_admission():
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=64, kv_budget_positions=10_000))
    seqs = [seq(2) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.admitted == seqs[:2]
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING, Status.WAITING]


def test_kv_budget_counts_slots_times_longest():
    # each request may reach 4 + 4 = 8 positions (virtual ones count); 20 positions hold two slots of 8
    sched = Scheduler(SchedulerConfig(max_running=8, max_tokens_per_step=64, kv_budget_positions=20))
    seqs = [seq(2, max_new=4, virtual=2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().admitted == seqs[:2]
    assert sched.fits_alone(seqs[2])
    assert not sched.fits_alone(seq(30))
    sched.finish(seqs[0])
    assert sched.schedule().admitted == [seqs[2]]


def test_finish_removes_from_either_queue():
    sched = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=8, kv_budget_positions=100))
    a, b = seq(2), seq(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(b)  # still waiting
    sched.finish(a)  # running
    assert not sched.has_work()
    assert a.finished and b.finished


@pytest.mark.parametrize("kwargs", [dict(max_running=0), dict(max_tokens_per_step=4, max_running=8),
                                    dict(kv_budget_positions=-1)])
def test_config_is_checked(kwargs):
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)
