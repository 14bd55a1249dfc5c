"""The engine: one background loop owns the model; callers submit requests and read their tokens.

Each step reads as a sentence: schedule, run, process the logits, postprocess. Requests of every
task and kind share the step; a request that fails gets its own error while the others and the loop go on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from server.engine import compiled, logits
from server.engine.admission import Admission, EngineRequest, TaskSource, TokenizedText
from server.engine.base_model import BaseModel
from server.engine.compiled import CompiledForward
from server.engine.config import EngineConfig
from server.engine.errors import (
    EngineStopped,
    InvalidConfig,
    InvalidParameter,
    QueueFull,
    RequestFailed,
)
from server.engine.executor import StepExecutor
from server.engine.grammar import Grammars
from server.engine.handle import RequestHandle
from server.engine.kv import PagedKV
from server.engine.pages import PAGE_SIZE
from server.engine.runner import ModelRunner
from server.engine.samples import SampleGroup
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import SamplingParams, Sequence
from server.machine import threads
from server.machine.memory import default_kv_budget

__all__ = ["Engine", "EngineRequest", "EngineStats", "TaskSource", "TokenizedText"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    kv_bytes: int  # storage allocated for the KV pool now
    kv_budget_bytes: int
    kv_pages_total: int
    kv_pages_used: int  # held by requests, task prefixes and the prefix cache
    kv_pages_shared: int  # held by task prefixes
    preemptions: int
    peak_running: int
    prompt_cache_bytes: int
    prompt_cache_budget_bytes: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int
    prefix_cache_queries: int  # text tokens looked up in the prefix cache at admission
    prefix_cache_hits: int  # of those, the tokens whose keys and values were reused
    kv_pages_cached: int  # full pages the prefix cache holds (some read by running requests)


class Engine:
    def __init__(self, base: BaseModel, tasks: TaskSource, config: EngineConfig | None = None) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.tasks = tasks
        self.config = config or EngineConfig()
        self.max_context = min(self.config.max_context or base.max_context, base.max_context)
        if self.config.kv_cache_bytes is not None:
            self.kv_budget_bytes = self.config.kv_cache_bytes
        else:
            self.kv_budget_bytes, why = default_kv_budget(base.devices_of_layers(),
                                                          self.config.kv_cache_memory_fraction)
            log.info("KV cache budget %.2f GiB: %s (--kv-cache-bytes sets it)", self.kv_budget_bytes / 2**30, why)
        g = base.geometry
        self.page_bytes = PAGE_SIZE * PagedKV.position_bytes(g.num_layers, g.num_kv_heads, g.head_dim, base.dtype)
        total_pages = self.kv_budget_bytes // self.page_bytes - 1  # one page is the null page (pages.py)
        if total_pages < 1:
            raise InvalidConfig("kv_cache_bytes", f"at least two KV pages of this model ({2 * self.page_bytes} bytes; "
                                f"a page is {self.page_bytes} bytes: {PAGE_SIZE} positions of every layer's keys "
                                "and values)", self.kv_budget_bytes)
        self.runner = ModelRunner(base, total_pages=total_pages + 1)
        self.compiled = self._compiled_forward()
        scheduler_config = SchedulerConfig(self.config.max_running, self.config.max_tokens_per_step, total_pages,
                                           self.config.prompt_cache_bytes // self.page_bytes,
                                           self.config.prefix_caching)
        self.scheduler = Scheduler(scheduler_config, eos_ids=_eos_ids(base.model), on_end=self._left)
        vocab_size = base.model.config.get_text_config().vocab_size
        self.executor = StepExecutor(self.runner, self.scheduler, vocab_size)
        log.info("automatic prefix caching %s (--%sprefix-caching)", "on" if self.config.prefix_caching else "off",
                 "no-" if self.config.prefix_caching else "")
        grammars = Grammars(self.tokenizer, vocab_size, self.scheduler.eos_ids,
                            cache_bytes=self.config.format_cache_bytes,
                            compile_timeout_s=self.config.format_compile_timeout_s)
        self.admission = Admission(self.tokenizer, tasks, self.max_context, self.scheduler, grammars, vocab_size)
        self._inbox: list[Sequence] = []  # submitted, not yet seen by the loop (guarded by _lock)
        # Submitted and not yet finished, wherever they are (inbox, waiting, running); guarded by _lock.
        # Admission counts this one number: the loop moves requests between its queues without the lock.
        self._in_flight = 0
        self._lock = threading.Condition()
        self._accepting = True
        self._stop = False
        self.steps = 0  # steps run so far (benchmarks count them)
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(ready,), name="promptswap-engine", daemon=True)
            self._thread.start()
            ready.wait()
            threads.single_threaded_here()  # the engine thread alone owns an OpenMP pool
            if self.compiled is not None:
                self._warm_up(self.compiled)

    def _compiled_forward(self) -> CompiledForward | None:
        """The compiled forward pass the runner calls, or None (eager) where --no-compile or it cannot run."""
        if not self.config.compile:
            log.info("compiled step off (--no-compile): every step runs eagerly")
            return None
        reason = compiled.unusable_reason(self.base.device, bool(self.base.layer_devices))
        if reason is not None:
            log.info("compiled step off: %s; every step runs eagerly", reason)
            return None
        cache = self.config.compile_cache_dir
        compiled.use_cache_dir(Path(cache) if cache else Path.home() / ".cache" / "promptswap" / "compile",
                               chosen=bool(cache))
        forward = CompiledForward(self.base.model)
        self.runner.forward = forward
        return forward

    def _warm_up(self, forward: CompiledForward) -> None:
        """Compile the step for the shapes it takes (compiled.py): a request alone (a prefill, then single decodes),
        then two together (batched rows). Runs before the engine serves anyone; if compiling fails, eager it is."""
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)

        def run() -> None:
            self.submit(EngineRequest("The compiled step warms up.", params=params)).result()
            for handle in [self.submit(EngineRequest(text, params=params)) for text in ("One.", "And two more.")]:
                handle.result()

        seconds = forward.warm_up(run)
        # Still inside start(): nothing else is submitted yet, and the engine thread waits for work.
        self.scheduler.forget_history()
        self.executor.settle()  # the warm-up's storage back
        self.steps = 0
        if forward.failure is not None:
            log.warning("compiled step off: compiling the forward pass failed (%s); every step runs eagerly",
                        forward.failure)
            forward.release()
            self.runner.forward = self.base.model
            self.compiled = None
            return
        log.info("compiled step ready in %.1f s (%d threads; kernels cached in %s)%s", seconds, forward.threads,
                 os.environ.get(compiled.CACHE_VARIABLE, "torch's default place"),
                 f"; one-row graph: the Linear weights kept plain too, +{forward.plain_bytes / 2**20:.0f} MiB"
                 if forward.plain_bytes else "")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout_s`, end the rest, stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and time.monotonic() < deadline:
            with self._lock:
                if not self._inbox and not self.scheduler.has_work():
                    break
            time.sleep(0.01)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout_s))
            self._thread = None
        self.admission.grammars.shutdown()

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Check and queue one request of one sample (admission.py); errors a client caused are raised here."""
        if request.n != 1:
            raise InvalidParameter("n", "1 here (Engine.submit_samples takes n samples)", request.n)
        [handle] = self.submit_samples(request)
        return handle

    @property
    def capacity(self) -> int:
        """Requests (samples) in flight at most: max_running run and max_queue more wait."""
        return self.config.max_running + self.config.max_queue

    def tokenize(self, request: EngineRequest) -> TokenizedText:
        """The tokens `request`'s text gives the model (its task's template applied), and the task's virtual
        tokens; the checks of a generating request. Any thread."""
        return self.admission.tokenize(request)

    def submit_samples(self, request: EngineRequest) -> SampleGroup:
        """Check and queue a request's `n` samples, one handle each; all are queued or none is."""
        if not self._accepting:
            raise EngineStopped()
        SampleGroup.check_fits(SampleGroup.check_n(request.n), self.capacity)
        samples = self.admission.admit_samples(request)
        with self._lock:
            if not self._accepting:
                raise EngineStopped()
            # Up to max_running run and max_queue more wait: a burst of exactly that many is all accepted,
            # even before the loop has moved the first ones into the running batch.
            if self._in_flight + len(samples) > self.capacity:
                raise QueueFull(self.config.max_queue)
            self._in_flight += len(samples)
            self._inbox.extend(samples)
            self._lock.notify_all()
        return SampleGroup(RequestHandle(seq) for seq in samples)

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv
        pool = kv.stats()
        with self._lock:
            waiting = len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.held)
            running = len(self.scheduler.running)
        return EngineStats(waiting, running, self.runner.kv.nbytes, self.kv_budget_bytes, pool.pages_total,
                           pool.pages_used, pool.pages_shared, self.scheduler.preemptions,
                           self.scheduler.peak_running, pool.pages_shared * self.page_bytes,
                           self.config.prompt_cache_bytes, pool.prefix_hits, pool.prefix_misses, pool.prefix_entries,
                           kv.cache_queries, kv.cache_hits, pool.pages_cached)

    # -- the loop (engine thread only) ---------------------------------------------------------

    def _loop(self, ready: threading.Event) -> None:
        adaptive = None
        try:
            taken = threads.take_threads(self.config.threads)
            log.info("engine: %d CPU threads for the model (%s)", taken, "--threads" if self.config.threads else
                     "the cores this process may use, affinity and cgroup quota, fewer while other processes "
                     "use them; --threads sets it")
            if self.config.threads is None and self.base.device.type == "cpu":
                adaptive = threads.AdaptiveThreads(taken)
        finally:
            ready.set()  # start() waits for this; never leave it hanging
        while True:
            if adaptive is not None and (count := adaptive.adjust()) is not None:
                log.info("engine: %d CPU thread(s) now: other processes use this process's cores",
                         threads.take_threads(count))
            with self._lock:
                while not self._stop and not self._inbox and not self.scheduler.has_work():
                    self._lock.wait()
                if self._stop:
                    break
                for seq in self._inbox:
                    self.scheduler.add(seq)
                self._inbox.clear()
            try:
                self.step()
            except Exception:  # a bug in the loop itself: fail what ran, keep serving the rest
                log.exception("engine step failed")
                # Each request's own failures are caught where they happen (executor.py, logits.py); this is the loop's.
                # Its message is the same for all: the exception may quote any request's content.
                for seq in list(self.scheduler.running):
                    failure = RequestFailed("the engine step this request was in failed; the server's log says why")
                    self.scheduler.end(seq, partial(seq.fail, failure))
                with self._lock:  # what the failed step ended may have gone uncounted: count what is left
                    self._in_flight = len(self._inbox) + len(self.scheduler.unfinished())
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for seq in inbox:
            seq.fail(EngineStopped("the server shut down before this request finished"))
        for seq in self.scheduler.unfinished():
            self.scheduler.end(seq, partial(seq.fail, EngineStopped("the server shut down before this request "
                                                                    "finished")))

    def step(self) -> None:
        """One step: schedule -> run -> process the logits -> postprocess (then, idle, give storage back). What
        fails for one request (its prefix, its forward pass, its logits) ends that request alone."""
        self.steps += 1
        scheduled = self.scheduler.schedule()
        output = self.executor.run(scheduled)
        self.scheduler.postprocess(logits.process(output))
        self.executor.settle()

    def _left(self, seq: Sequence) -> None:
        """A request finished or failed: its place in the queue is free again."""
        with self._lock:
            self._in_flight -= 1


def _eos_ids(model: Any) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))
