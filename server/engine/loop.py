"""The engine: one background loop owns the model; callers submit requests and read their tokens.

Each step reads as a sentence: take in new requests and cancellations, schedule, run, sample,
finish. Requests of every task and kind share the step; a request that fails gets its own
error while the others and the loop go on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from server.engine import threads as cpu_threads
from server.engine.detokenizer import IncrementalText
from server.engine.errors import EngineStopped, InvalidParameter, QueueFull, RequestCancelled, RequestFailed, RequestTooLong
from server.engine.handle import RequestHandle
from server.engine.model_loader import BaseModel
from server.engine.prompt_cache import PromptCache
from server.engine.runner import ModelRunner
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Completion, SamplingParams, Sequence, TokenDelta, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_running: int = 64  # requests decoding together
    max_tokens_per_step: int = 512  # tokens in one forward pass (decodes + prefill chunks)
    max_context: int | None = None  # positions per request, virtual tokens included; None: the model's
    max_queue: int = 1024  # waiting requests before new ones get QueueFull
    kv_cache_bytes: int = 2 * 2**30  # KV memory of running requests
    prompt_cache_bytes: int = 512 * 2**20  # device memory for precomputed task prefixes
    # torch intra-op threads of the engine thread (None: torch's default). Once the engine starts,
    # every other thread of the process runs torch on one thread; see server/cpu_threads.py.
    threads: int | None = None

    def __post_init__(self) -> None:
        SchedulerConfig(self.max_running, self.max_tokens_per_step)  # same checks, one place
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        for name in ("max_queue", "kv_cache_bytes", "prompt_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise ValueError(f"max_context must be an integer >= 2 or None, got {self.max_context!r}")


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    kv_bytes: int
    kv_budget_bytes: int
    prompt_cache_bytes: int
    prompt_cache_budget_bytes: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int


class Engine:
    def __init__(self, base: BaseModel, registry, config: EngineConfig | None = None) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.registry = registry
        self.config = config or EngineConfig()
        self.max_context = min(self.config.max_context or base.max_context, base.max_context)
        self.prompt_cache = PromptCache(self.config.prompt_cache_bytes)
        self.runner = ModelRunner(base, kv_budget_bytes=self.config.kv_cache_bytes, prompt_cache=self.prompt_cache,
                                  max_running=self.config.max_running)
        kv_positions = max(1, self.config.kv_cache_bytes // self.runner.kv.bytes_per_position)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_running, self.config.max_tokens_per_step,
                                                   kv_positions))
        eos = getattr(base.model.generation_config, "eos_token_id", None) or base.model.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._inbox: list[Sequence] = []
        self._lock = threading.Condition()
        self._handles: dict[int, RequestHandle] = {}
        self._texts: dict[int, IncrementalText] = {}
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(ready,), name="promptswap-engine", daemon=True)
            self._thread.start()
            ready.wait()
            cpu_threads.single_threaded_here()  # the engine thread alone owns an OpenMP pool

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `timeout_s`, cancel the rest, stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and time.monotonic() < deadline:
            with self._lock:
                if not self._inbox and not self.scheduler.has_work():
                    break
            time.sleep(0.01)
        with self._lock:
            for handle in list(self._handles.values()):
                handle.cancel()
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout_s))
            self._thread = None

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, text: str, *, task: str | None = None, params: SamplingParams | None = None) -> RequestHandle:
        """Validate and queue one request; errors a client caused are raised here, before the loop."""
        params = params or SamplingParams()
        if not self._accepting:
            raise EngineStopped()
        snapshot = self.registry.get(task) if task is not None else None  # UnknownTask
        prompt_ids = list(self.tokenizer(text)["input_ids"])
        if not prompt_ids:
            raise InvalidParameter("text", "a text that gives at least one token", text)
        num_virtual = snapshot.num_virtual_tokens if snapshot is not None else 0
        used = num_virtual + len(prompt_ids)
        if used + 1 > self.max_context:
            raise RequestTooLong(self.max_context - 1, used,
                                 f"{num_virtual} virtual + {len(prompt_ids)} text tokens, +1 to generate")
        # Generation stops at the context's end (finish_reason "length") rather than refusing.
        room = self.max_context - used
        if params.max_new_tokens > room:
            params = _replace_max_new_tokens(params, room)
        seq = Sequence(prompt_ids=prompt_ids, params=params, task=task, prompt=snapshot, num_virtual=num_virtual)
        if not self.scheduler.fits_alone(seq):
            limit = self.scheduler.config.kv_budget_positions
            raise RequestTooLong(limit, seq.max_total_len, "virtual + text + max_new_tokens exceed the KV budget",
                                 param="max_new_tokens")
        seq.rng = make_generator(seq, self.base.device)
        handle = RequestHandle(seq, self)
        with self._lock:
            if not self._accepting:
                raise EngineStopped()
            if len(self._inbox) + len(self.scheduler.waiting) >= self.config.max_queue:
                raise QueueFull(self.config.max_queue)
            self._handles[seq.id] = handle
            self._inbox.append(seq)
            self._lock.notify_all()
        return handle

    def cancel(self, seq: Sequence) -> None:
        """Mark a request cancelled; the loop drops it at the next step and frees its slot."""
        with self._lock:
            seq.cancelled = True
            self._lock.notify_all()

    def stats(self) -> EngineStats:
        cache = self.prompt_cache.stats()
        with self._lock:
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            running = len(self.scheduler.running)
        return EngineStats(waiting, running, self.runner.kv.nbytes, self.config.kv_cache_bytes, cache.bytes,
                           cache.budget_bytes, cache.hits, cache.misses, cache.entries)

    # -- the loop (engine thread only) ---------------------------------------------------------

    def _loop(self, ready: threading.Event) -> None:
        try:
            cpu_threads.take_threads(self.config.threads)
        finally:
            ready.set()  # start() waits for this; never leave it hanging
        while True:
            with self._lock:
                while not self._stop and not self._inbox and not self.scheduler.has_work():
                    self._lock.wait()
                if self._stop:
                    break
                for seq in self._inbox:
                    self.scheduler.add(seq)
                    self._texts[seq.id] = IncrementalText(self.tokenizer, seq.prompt_ids, seq.params.stop)
                self._inbox.clear()
            try:
                self._step()
            except Exception as exc:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("engine step failed")
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(seq, error=RequestFailed(f"engine step failed: {exc}"))
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, error=RequestCancelled())

    def _step(self) -> None:
        for seq in [s for s in list(self.scheduler.running) + list(self.scheduler.waiting) if s.cancelled]:
            self._finish(seq, error=RequestCancelled())
        step = self.scheduler.schedule()
        try:
            self.runner.reserve(step.admitted, self.scheduler.waiting)
        except Exception:  # e.g. out of memory: each admission below then fails on its own
            log.exception("could not size the KV slots for %d joining requests", len(step.admitted))
        for seq in step.admitted:
            self._admit(seq)
        batch = [(seq, n) for seq, n in step.batch if not seq.finished]
        if not batch:
            return
        logits, batch = self._run_isolated(batch)
        sampling = [seq for seq, n in batch if seq.num_cached + n == seq.num_tokens]
        tokens = sample(logits, sampling) if sampling else []
        for seq, n in batch:
            seq.num_cached += n
        for seq, token in zip(sampling, tokens, strict=True):
            self._append(seq, token)

    def _admit(self, seq: Sequence) -> None:
        try:
            self.runner.add(seq)
        except Exception as exc:
            log.exception("could not admit request %d", seq.id)
            self._finish(seq, error=RequestFailed(f"could not prepare the task prefix: {exc}"))

    def _run_isolated(self, batch):
        """Run the batch; if it fails, run each request alone so only the failing ones get the error."""
        try:
            return self.runner.run(batch), batch
        except Exception:
            log.exception("batched step failed; retrying its %d requests one by one", len(batch))
        kept, rows = [], []
        for seq, n in batch:
            try:
                logits = self.runner.run([(seq, n)])
            except Exception as exc:
                self._finish(seq, error=RequestFailed(f"the model failed on this request: {exc}"))
                continue
            kept.append((seq, n))
            rows.append(logits)
        vocab = self.base.model.config.get_text_config().vocab_size
        return (torch.cat(rows) if rows else torch.empty(0, vocab)), kept

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        text = self._texts[seq.id]
        piece = text.add(token)
        self._handles[seq.id].push(TokenDelta(piece, (token,)))
        if text.stopped:
            self._finish(seq, reason="stop")
        elif token in self.eos_ids and not seq.params.ignore_eos:
            self._finish(seq, reason="eos")
        elif len(seq.output_ids) >= seq.params.max_new_tokens:
            self._finish(seq, reason="length")

    def _finish(self, seq: Sequence, *, reason: str | None = None, error: BaseException | None = None) -> None:
        self.scheduler.finish(seq)
        self.runner.remove(seq)
        text = self._texts.pop(seq.id, None)
        with self._lock:
            handle = self._handles.pop(seq.id, None)
        if handle is None:
            return
        if error is not None:
            seq.error = error
            handle.fail(error)
            return
        seq.finish_reason = reason
        tail = text.finish() if text is not None else ""
        if tail:
            handle.push(TokenDelta(tail, ()))
        usage = Usage(len(seq.prompt_ids), seq.num_virtual, len(seq.output_ids))
        handle.complete(Completion(seq.task, text.text if text else "", tuple(seq.output_ids), reason, usage))


def _replace_max_new_tokens(params: SamplingParams, value: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_new_tokens=value)
