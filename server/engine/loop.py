"""The engine: one background loop owns the model; callers submit requests and read their tokens.

Each step reads as a sentence: schedule, run, sample, post-process. Requests of every task and
kind share the step; a request that fails gets its own error while the others and the loop go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence as TypingSequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from prompt_store.registry import PromptSnapshot
from prompt_store.template import MAX_CHOICE_CHARS, apply_template
from server.engine import threads
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalText
from server.engine.errors import (
    EngineStopped,
    InvalidConfig,
    InvalidParameter,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    RequestTooLong,
)
from server.engine.handle import RequestHandle
from server.engine.kv import PagedKV
from server.engine.memory import default_kv_budget
from server.engine.model_loader import BaseModel
from server.engine.pages import PAGE_SIZE, SharedPrefix
from server.engine.runner import ModelRunner
from server.engine.sampler import make_generator, sample
from server.engine.scheduler import Batch, Scheduler, SchedulerConfig
from server.engine.sequence import MAX_CHOICES, SamplingParams, Sequence, TokenLogprob

log = logging.getLogger(__name__)


class TaskSource(Protocol):
    """What the engine needs from the prompt store: a task's current prompt version, or UnknownTask."""

    def get(self, task: str) -> PromptSnapshot: ...


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    kv_bytes: int  # storage allocated for the KV pool now
    kv_budget_bytes: int
    kv_pages_total: int
    kv_pages_used: int  # held by requests and task prefixes
    kv_pages_shared: int  # held by task prefixes
    preemptions: int
    peak_running: int
    prompt_cache_bytes: int
    prompt_cache_budget_bytes: int
    prompt_cache_hits: int
    prompt_cache_misses: int
    prompt_cache_entries: int


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
        scheduler_config = SchedulerConfig(self.config.max_running, self.config.max_tokens_per_step, total_pages,
                                           self.config.prompt_cache_bytes // self.page_bytes)
        self.scheduler = Scheduler(scheduler_config, eos_ids=_eos_ids(base.model))
        # No token spans more characters than the longest vocabulary entry, so a text of N characters
        # has at least N / this many tokens: a cheap bound that refuses a huge text before tokenizing it.
        self.longest_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        self._inbox: list[Sequence] = []  # submitted, not yet seen by the loop (guarded by _lock)
        # Submitted and not yet finished, wherever they are (inbox, waiting, running); guarded by _lock.
        # Admission counts this one number: the loop moves requests between its queues without the lock.
        self._in_flight = 0
        self._lock = threading.Condition()
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
            threads.single_threaded_here()  # the engine thread alone owns an OpenMP pool

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

    # -- submission (any thread) ---------------------------------------------------------------

    def submit(self, text: str, *, task: str | None = None, params: SamplingParams | None = None,
               raw: bool = False, choices: TypingSequence[str] | bool | None = None,
               add_special_tokens: bool = True, prompt: PromptSnapshot | None = None) -> RequestHandle:
        """Validate and queue one request; errors a client caused are raised here, before the loop. The
        task's text template (the one it was trained with) frames the text unless `raw`. With `choices`
        (or True: the task's stored choices) the request scores each choice instead of generating."""
        params = params or SamplingParams()
        if not self._accepting:
            raise EngineStopped()
        # `prompt`: the task's version the caller already read (its defaults applied): the same one runs.
        snapshot = prompt if prompt is not None else self.tasks.get(task) if task is not None else None
        num_virtual = snapshot.num_virtual_tokens if snapshot is not None else 0
        if snapshot is not None and not raw:
            text = apply_template(snapshot.template, text)  # the same version's template as its weights
        _check_encodable(text)
        at_least = -(-len(text) // self.longest_token_chars)
        if num_virtual + at_least + 1 > self.max_context:
            raise RequestTooLong(self.max_context - 1, num_virtual + at_least,
                                 f"{num_virtual} virtual + at least {at_least} text tokens in {len(text)} characters, "
                                 "+1 to generate")
        # A chat template writes its own special tokens: the tokenizer must not add a second BOS then.
        prompt_ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if not prompt_ids:
            raise InvalidParameter("text", "a text that gives at least one token", text)
        used = num_virtual + len(prompt_ids)
        if used + 1 > self.max_context:
            raise RequestTooLong(self.max_context - 1, used,
                                 f"{num_virtual} virtual + {len(prompt_ids)} text tokens, +1 to generate")
        scored = self._choices(choices, snapshot, used) if choices is not None and choices is not False else None
        if scored is not None and params.prompt_logprobs:
            raise InvalidParameter("choices", "absent with prompt log-probabilities (echo)", "both")
        if scored is not None:  # a scoring answer has no per-token log-probabilities (a task default may ask)
            params = replace(params, logprobs=None)
        # Generation stops at the context's end (finish_reason "length") rather than refusing.
        params = replace(params, max_new_tokens=min(params.max_new_tokens, self.max_context - used))
        seq = Sequence(prompt_ids=prompt_ids, params=params, task=task, prompt=snapshot, num_virtual=num_virtual,
                       detokenizer=IncrementalText(self.tokenizer, prompt_ids, params.stop), choices=scored)
        if not self.scheduler.fits_alone(seq):
            what, param = ("the choices' tokens", "choices") if seq.scoring else ("max_new_tokens", "max_new_tokens")
            raise RequestTooLong(self.scheduler.config.kv_pages * PAGE_SIZE, seq.max_total_len,
                                 f"virtual + text + {what} need {self.scheduler.pages_needed(seq)} KV pages "
                                 f"of {PAGE_SIZE} positions; the KV budget holds {self.scheduler.config.kv_pages}",
                                 param=param)
        seq.rng = make_generator(seq.params)
        with self._lock:
            if not self._accepting:
                raise EngineStopped()
            # Up to max_running run and max_queue more wait: a burst of exactly that many is all accepted,
            # even before the loop has moved the first ones into the running batch.
            if self._in_flight >= self.config.max_running + self.config.max_queue:
                raise QueueFull(self.config.max_queue)
            self._in_flight += 1
            self._inbox.append(seq)
            self._lock.notify_all()
        return RequestHandle(seq)

    def _choices(self, choices: TypingSequence[str] | bool, snapshot: PromptSnapshot | None,
                 used: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Each choice with its tokens (`tokenizer(choice, add_special_tokens=False)`, appended to the text's)."""
        if choices is True:
            if snapshot is None or not snapshot.choices:
                raise InvalidParameter("choices", "a list of strings, or true for a task that stores its choices "
                                       "(trained with promptswap train)",
                                       f"true, but {'no task was named' if snapshot is None else 'the task has none'}")
            texts = list(snapshot.choices)
        else:
            texts = list(choices)  # type: ignore[arg-type]  # not a bool here
        if not 1 <= len(texts) <= MAX_CHOICES:
            raise InvalidParameter("choices", f"1..{MAX_CHOICES} strings", len(texts))
        longest = max((len(t) for t in texts if isinstance(t, str)), default=0)
        if longest > MAX_CHOICE_CHARS:
            raise InvalidParameter("choices", f"strings of at most {MAX_CHOICE_CHARS} characters", longest)
        if len(set(texts)) != len(texts):
            raise InvalidParameter("choices", "distinct strings", texts)
        scored = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise InvalidParameter(f"choices[{i}]", "a non-empty string", text)
            _check_encodable(text, f"choices[{i}]")
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise InvalidParameter(f"choices[{i}]", "a choice that gives at least one token", text)
            if used + len(ids) > self.max_context:
                raise RequestTooLong(self.max_context, used + len(ids),
                                     f"the text and choice {i} ({len(ids)} tokens) need {used + len(ids)} positions",
                                     param=f"choices[{i}]")
            scored.append((text, ids))
        # The choices' tokens but each one's last go through one step together: they must fit one.
        together = sum(len(ids) - 1 for _, ids in scored)
        if together > self.scheduler.config.max_tokens_per_step:
            raise InvalidParameter("choices", f"choices whose tokens (but each one's last) fit one step: at most "
                                   f"{self.scheduler.config.max_tokens_per_step} (--max-tokens-per-step)", together)
        return tuple(scored)

    def stats(self) -> EngineStats:
        pool = self.scheduler.pool.stats()
        with self._lock:
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            running = len(self.scheduler.running)
        return EngineStats(waiting, running, self.runner.kv.nbytes, self.kv_budget_bytes, pool.pages_total,
                           pool.pages_used, pool.pages_shared, self.scheduler.preemptions,
                           self.scheduler.peak_running, pool.pages_shared * self.page_bytes,
                           self.config.prompt_cache_bytes, pool.prefix_hits, pool.prefix_misses, pool.prefix_entries)

    # -- the loop (engine thread only) ---------------------------------------------------------

    def _loop(self, ready: threading.Event) -> None:
        try:
            threads.take_threads(self.config.threads)
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
                self._inbox.clear()
            try:
                self.step()
            except Exception as exc:  # a bug in the loop itself: fail what runs, keep serving
                log.exception("engine step failed")
                for seq in self._unfinished():
                    self._fail(seq, RequestFailed(f"engine step failed: {exc}"))
                with self._lock:  # what the failed step finished went uncounted: nothing but the inbox is left
                    self._in_flight = len(self._inbox)
        with self._lock:
            leftovers = self._inbox + self._unfinished()
            self._inbox = []
        for seq in leftovers:
            self._fail(seq, EngineStopped("the server shut down before this request finished"))

    def step(self) -> None:
        """One step of the loop: schedule, run, sample, post-process."""
        for seq in self._unfinished():
            if seq.cancelled:
                self._fail(seq, RequestCancelled())
        step = self.scheduler.schedule()
        if step.preempted:
            log.info("KV pool full: preempted %d request(s), to be recomputed", len(step.preempted))
        self.runner.fit_storage(self.scheduler.pool.high_water)
        self.runner.clear_pages(self.scheduler.pool.take_fresh())
        computed = self._prepare_prefixes(step.new_prefixes)
        batch = [(seq, n) for seq, n in step.batch if not seq.finished]
        if batch or computed:
            logits, batch = self._run(batch, computed)
            picking, pick_rows, scored = [], [], []
            offset = 0
            for seq, n in batch:  # each request's logits rows, in batch order (Sequence.rows_kept)
                kept = seq.rows_kept(n)
                rows = logits[offset:offset + kept]
                offset += kept
                if seq.scoring:
                    scored.append((seq, n, rows))
                    continue
                if seq.params.prompt_logprobs and kept == n:  # row r predicts the step's token r + 1
                    seq.record_prompt_logprobs(n, token_logprobs(rows, seq.all_ids[seq.num_cached + 1:],
                                                                 seq.params.logprobs or 0))
                if seq.samples_after(n):
                    picking.append(seq)
                    pick_rows.append(rows[-1:])
            picks = torch.cat(pick_rows) if pick_rows else logits[:0]
            tokens = sample(picks, picking)
            reported = [token_logprobs(picks[i:i + 1], [token], seq.params.logprobs)[0]
                        if seq.params.logprobs is not None else None
                        for i, (seq, token) in enumerate(zip(picking, tokens, strict=True))]
            done = [seq for seq, n, rows in scored if score_choices(seq, n, rows)]
            self.scheduler.postprocess(batch, tokens, release=lambda seq: self._left(), logprobs=reported)
            for seq in done:
                self.scheduler.end(seq, lambda seq: self._left(), seq.finish_scoring)
        if not self.scheduler.running:  # idle: give back the storage no page uses
            self.runner.fit_storage(self.scheduler.pool.used_extent(), idle=True)

    def _left(self) -> None:
        """A request finished or failed: its place in the queue is free again."""
        with self._lock:
            self._in_flight -= 1

    def _unfinished(self) -> list[Sequence]:
        return [*self.scheduler.running, *self.scheduler.waiting]

    def _prepare_prefixes(self, entries: list[SharedPrefix]) -> list[SharedPrefix]:
        """Write the prefix tables first used this step; return the soft prompts, which the step's own
        forward pass computes (`_run`)."""
        computed = []
        for entry in entries:
            if self.runner.is_computed(entry):
                computed.append(entry)
            else:
                self._prepare_alone(entry)
        return computed

    def _prepare_alone(self, entry: SharedPrefix) -> None:
        """Compute (or write) one prefix on its own; if that fails, only the requests reading it fail."""
        try:
            self.runner.compute_prefix(entry)
        except Exception as exc:
            self._prefix_failed(entry, exc)
            return
        self._prefix_ready(entry)

    def _prefix_ready(self, entry: SharedPrefix) -> None:
        entry.ready = True
        entry.source = None

    def _prefix_failed(self, entry: SharedPrefix, exc: Exception) -> None:
        """The requests that read this prefix fail alone; the next request of the task computes it anew."""
        log.exception("could not compute a task prefix")
        self.scheduler.forget_prefix(entry)
        for seq in [s for s in self.scheduler.running if s.prefix is entry]:
            self._fail(seq, RequestFailed(f"could not prepare the task prefix: {exc}"))

    def _run(self, batch: Batch, prefixes: list[SharedPrefix]) -> tuple[torch.Tensor, Batch]:
        """Run the batch (computing `prefixes` in the same pass); if it fails, compute each prefix and
        run each request alone, so only the failing ones get the error."""
        try:
            logits = self.runner.run(batch, prefixes)
        except Exception:
            log.exception("batched step failed; retrying its %d requests one by one", len(batch))
        else:
            for entry in prefixes:
                self._prefix_ready(entry)
            return logits, batch
        for entry in prefixes:
            self._prepare_alone(entry)
        kept: Batch = []
        rows = []
        for seq, n in batch:
            if seq.finished:  # its prefix failed above
                continue
            try:
                logits = self.runner.run([(seq, n)])
            except Exception as exc:
                self._fail(seq, RequestFailed(f"the model failed on this request: {exc}"))
                continue
            kept.append((seq, n))
            rows.append(logits)
        vocab = self.base.model.config.get_text_config().vocab_size
        return (torch.cat(rows) if rows else torch.empty(0, vocab)), kept

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self.scheduler.finish(seq)
        seq.fail(error)
        self._left()


def token_logprobs(rows: torch.Tensor, targets: TypingSequence[int], top: int) -> list[TokenLogprob]:
    """For each row (up to len(targets)): the target token's log-probability in the row's raw distribution,
    and the `top` most likely tokens there."""
    rows = rows[:len(targets)]
    if not len(rows):
        return []
    logprobs = torch.log_softmax(rows.float(), dim=-1)  # [k, vocab]
    chosen = logprobs[torch.arange(len(rows)), torch.tensor(list(targets[:len(rows)]), dtype=torch.long)].tolist()
    best_values, best_ids = (torch.topk(logprobs, top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long()))
    return [TokenLogprob(int(t), lp, tuple(zip(ids, values, strict=True)))
            for t, lp, ids, values in zip(targets, chosen, best_ids.tolist(), best_values.tolist(), strict=False)]


def score_choices(seq: Sequence, n: int, rows: torch.Tensor) -> bool:
    """Take a scoring request's logits rows of this step; True when every choice is scored.

    The text's last row gives each choice's first token; the choices' step gives, for each choice, its
    other tokens, one row per token before them. Log-probabilities come from the raw distribution."""
    assert seq.choices is not None
    if not len(rows):
        return False  # a chunk of the text, not its last
    logprobs = torch.log_softmax(rows.float(), dim=-1)  # [k, vocab]
    if not seq.computes_choices(n):
        firsts = torch.tensor([ids[0] for _, ids in seq.choices], device=logprobs.device)
        seq.choice_logprobs = [[lp] for lp in logprobs[0, firsts].tolist()]
        return seq.choice_tokens == 0
    row = 0
    for (_, ids), scored in zip(seq.choices, seq.choice_logprobs, strict=True):
        following = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)  # empty for a 1-token choice
        scored.extend(logprobs[row + torch.arange(len(following), device=logprobs.device), following].tolist())
        row += len(following)
    return True


def _check_encodable(text: str, param: str = "text") -> None:
    """A lone UTF-16 surrogate (e.g. JSON's "\\ud800") is a valid Python str but no text a tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(param, "text that can be encoded as UTF-8 (no lone surrogate code points)",
                               f"{exc.object[exc.start:exc.end]!r} at character {exc.start}") from None


def _eos_ids(model: Any) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))
