"""The scheduler is plain Python: schedule() and postprocess() tested here without torch or a model."""

import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalText
from server.engine.errors import InvalidConfig
from server.engine.results import TokenDelta
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import SamplingParams, Sequence, Status
from tests.engine.steps import sampled

EOS = 0


def seq(prompt_len: int, max_new: int = 4, virtual: int = 0, **params) -> Sequence:
    return Sequence(prompt_ids=list(range(prompt_len)), params=SamplingParams(max_new_tokens=max_new, **params),
                    num_virtual=virtual)


def run_step(sched: Scheduler, token: int = 7):
    """Pretend the runner computed the step and sampled `token` for each request that samples."""
    step = sched.schedule()
    sampling = [s for s, n in step.batch if s.samples_after(n)]
    finished = sched.postprocess(sampled(step.batch, [token] * len(sampling)))
    return step, finished


def test_request_state_and_scheduler_import_no_torch():
    modules = "server.engine.scheduler, server.engine.sequence, server.engine.detokenizer, server.engine.config"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decodes_come_first_and_long_prompts_are_chunked():
    sched = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=16, kv_pages=1000))
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
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=8, kv_pages=1000))
    s = seq(20, max_new=2)
    sched.add(s)
    sizes = []
    while not s.finished:
        step, _ = run_step(sched)
        sizes.append(step.batch[0][1])
    assert sizes == [8, 8, 4, 1]  # three prefill chunks, then one decode
    assert s.output_ids == [7, 7]
    assert s.finish_reason == "length"
    assert s.output.result(timeout=1).token_ids == (7, 7)


def test_postprocess_advances_caches_and_only_prefill_ends_sample():
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=6, kv_pages=1000))
    a, b = seq(4, max_new=3), seq(10, max_new=3)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.batch == [(a, 4), (b, 2)]
    assert [s.samples_after(n) for s, n in step.batch] == [True, False]
    assert sched.postprocess(sampled(step.batch, [5])) == []
    assert (a.num_cached, a.output_ids, b.num_cached, b.output_ids) == (4, [5], 2, [])


def test_postprocess_finishes_on_eos_unless_ignored():
    sched = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=64, kv_pages=1000),
                      eos_ids=frozenset({EOS}))
    stops, ignores = seq(3, max_new=5), seq(3, max_new=5, ignore_eos=True)
    sched.add(stops)
    sched.add(ignores)
    _, finished = run_step(sched, token=EOS)
    assert finished == [stops] and stops.finish_reason == "eos" and stops.status is Status.FINISHED
    assert sched.running == [ignores]
    while not ignores.finished:
        run_step(sched, token=EOS)
    assert ignores.finish_reason == "length" and ignores.output_ids == [EOS] * 5


def test_postprocess_finishes_on_a_stop_string_and_holds_it_back(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    sched = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=64, kv_pages=1000))
    text_ids = tokenizer("the quick brown fox jumps")["input_ids"]
    params = SamplingParams(max_new_tokens=len(text_ids) + 5, stop=("fox",))
    s = Sequence(prompt_ids=[1, 2], params=params, detokenizer=IncrementalText(tokenizer, [1, 2], params.stop))
    sched.add(s)
    for token in text_ids:
        step = sched.schedule()
        sched.postprocess(sampled(step.batch, [token]))
        if s.finished:
            break
    assert s.finish_reason == "stop"
    pieces = [item.text for item in s.output if isinstance(item, TokenDelta)]
    assert "".join(pieces) == "the quick brown " == s.output.result(timeout=1).text
    assert not sched.has_work()


def test_max_running_and_fifo_admission():
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=64, kv_pages=1000))
    seqs = [seq(2) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert step.admitted == seqs[:2]
    assert [s.status for s in seqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING, Status.WAITING]


def test_end_removes_from_either_queue():
    sched = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=8, kv_pages=100))
    a, b, never_added = seq(2), seq(2), seq(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.end(b, lambda: None)  # still waiting
    sched.end(a, lambda: None)  # running
    sched.end(never_added, lambda: None)  # e.g. still in the engine's inbox at shutdown
    assert not sched.has_work()
    assert a.finished and b.finished and never_added.finished


@pytest.mark.parametrize(("kwargs", "field"), [(dict(max_running=0), "max_running"),
                                               (dict(max_tokens_per_step=4, max_running=8), "max_tokens_per_step"),
                                               (dict(kv_pages=0), "kv_pages")])
def test_config_is_checked_naming_the_field(kwargs, field):
    with pytest.raises(InvalidConfig) as err:
        SchedulerConfig(**kwargs)
    assert err.value.field == field and str(err.value).startswith(f"{field} must be")


def ids_seq(ids: list[int], max_new: int = 1) -> Sequence:
    return Sequence(prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new))


def run_to_end(sched: Scheduler) -> list[Sequence]:
    """Steps until nothing is left; the requests in the order they were admitted."""
    admitted = []
    while sched.has_work():
        step, _ = run_step(sched)
        admitted += step.admitted
    return admitted


INSTRUCTION = list(range(100, 148))  # three full pages


def test_a_request_whose_pages_are_cached_goes_before_one_that_computes_everything():
    sched = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=64, kv_pages=1000))
    sched.add(ids_seq([*INSTRUCTION, 1, 2]))
    run_to_end(sched)  # its three full pages stay in the prefix cache
    cold, warm = ids_seq(list(range(300, 350))), ids_seq([*INSTRUCTION, 3, 4])
    sched.add(cold)
    sched.add(warm)
    assert run_to_end(sched) == [warm, cold]
    assert warm.num_cached == cold.num_cached == 50  # both have every position (warm read 48 of them)
    assert sched.kv.cache_hits == 48


def test_without_cached_pages_admission_is_first_come_first_served():
    for caching in (True, False):
        sched = Scheduler(SchedulerConfig(max_running=1, max_tokens_per_step=64, kv_pages=1000,
                                          prefix_caching=caching))
        sched.add(ids_seq([*INSTRUCTION, 1, 2]))
        run_to_end(sched)
        seqs = [ids_seq(list(range(300 + 60 * i, 350 + 60 * i))) for i in range(3)]
        if not caching:
            seqs.append(ids_seq([*INSTRUCTION, 3, 4]))  # caching off: its pages are not there to read
        for s in seqs:
            sched.add(s)
        assert run_to_end(sched) == seqs


def test_the_first_in_line_is_overtaken_at_most_max_running_times():
    sched = Scheduler(SchedulerConfig(max_running=2, max_tokens_per_step=256, kv_pages=1000))
    sched.add(ids_seq([*INSTRUCTION, 1, 2]))
    run_to_end(sched)
    cold = ids_seq(list(range(300, 350)))
    warm = [ids_seq([*INSTRUCTION, 3, i]) for i in range(4)]
    sched.add(cold)
    for s in warm:
        sched.add(s)
    order = run_to_end(sched)
    assert order.index(cold) == 2  # two (max_running) requests with cached pages went first, then it did
    assert order == [*warm[:2], cold, *warm[2:]]
    assert cold.overtaken == 2


def test_a_request_waits_to_read_the_pages_a_running_request_is_computing():
    sched = Scheduler(SchedulerConfig(max_running=4, max_tokens_per_step=20, kv_pages=1000))
    first, second = ids_seq([*INSTRUCTION, 1, 2]), ids_seq([*INSTRUCTION, 3, 4])
    other = ids_seq(list(range(300, 310)))
    for s in (first, second, other):
        sched.add(s)
    order = run_to_end(sched)
    assert order == [first, other, second]  # `other` went by while `first` computed the shared pages
    assert sched.kv.cache_hits == 48  # `second` read all three instead of computing any of them twice
