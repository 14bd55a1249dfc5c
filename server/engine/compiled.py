"""The model's forward pass captured by torch.compile (`--compile`, the default): a step is a few calls into
generated kernels instead of thousands of small eager ops.

What is captured: the whole model (embeddings, norms, rotary, MLPs, head) with the two ops promptswap owns
left opaque, `promptswap::attend` (attention over the KV pages, server/engine/attention.py) and
`promptswap::packed_linear` (server/model/cpu_linear.py). While the compiled step runs, decode attention over
large groups reads the KV pages in place, through a compiled reader of its own (attention.py's
`_decode_in_place`) instead of gathering them into a copy. The number of tokens in a step and the rows kept
are marked unbacked (any size, 1 included), so one graph serves every step; on the CPU, steps of one token
run a second graph (server/engine/one_row.py), static but for the length of the request's history, whose
attention is traced into it (attention.attend_one: the key and value written into their page, the pages read
in place), so that a decode step at one request is one call with no Python per layer. The warm-up (`Engine.start`) runs
a request alone (a prefill, then one-token steps) and two together (batched rows). After the warm-up nothing
compiles any more: a call whose guards fail runs eagerly (torch's "eager_on_recompile" stance), so a request
never waits for a compiler.

Compiled code is specialized to the thread count it was compiled under; when the engine gives up threads on
a busy machine (server/machine/threads.py), steps run eagerly until it has its own count back. Compiled
kernels are cached on disk (`--compile-cache-dir`), so a restart reuses them. Where compilation cannot run
(no C++ compiler on the CPU, a model spread over devices, torch's dynamo disabled), the engine serves eagerly
and one line says why.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from server.engine.attention import LAYOUT_KWARG, active_layout, in_place_attention
from server.engine.one_row import ONE_ROW

log = logging.getLogger(__name__)

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # where inductor keeps its compiled kernels and graphs

# How a step runs once the warm-up is over: a call whose guards fail runs eagerly, never compiles (tests make it
# "fail_on_recompile", to see that the warm-up's graphs cover every step they run).
SERVING_STANCE = "eager_on_recompile"


def unusable_reason(device: torch.device, spread: bool) -> str | None:
    """Why the forward pass cannot be compiled here, or None."""
    if torch._dynamo.config.disable:
        return "torch's dynamo is disabled (TORCH_COMPILE_DISABLE)"
    if spread:
        return "the model is spread over several devices"
    if device.type == "cpu" and not _cxx_compiler():
        return "no C++ compiler found (inductor needs one on the CPU: install g++, or set CXX)"
    return None


def _cxx_compiler() -> str | None:
    wanted = os.environ.get("CXX")
    if wanted:
        return shutil.which(wanted)
    return next((found for name in ("g++", "c++", "clang++") if (found := shutil.which(name))), None)


def use_cache_dir(path: Path, chosen: bool) -> str:
    """Keep compiled kernels under `path`: always when it was `chosen` (--compile-cache-dir), else unless the
    environment names a place (torch writes its own default, under /tmp, into the variable once it has looked:
    that one is not a choice). Returns the place in effect."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(CACHE_VARIABLE)
    if chosen or current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        path.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_VARIABLE] = str(path)
    return os.environ[CACHE_VARIABLE]


class CompiledForward:
    """Calls the model the way `ModelRunner.run` does, through its compiled graph where one is ready."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        checked = _inputs_checked if _attributes_fixed(model) else None
        self.compiled = torch.compile(model, dynamic=True, options={"guard_filter_fn": checked})
        # The one-row graph, where layers keep a plain weight (server/engine/one_row.py); static but for the history's
        # length.
        self.plain_bytes = sum(m.keep_plain() for m in model.modules() if hasattr(m, "keep_plain"))
        self.one_row = (torch.compile(model, dynamic=False, options={"guard_filter_fn": checked})
                        if self.plain_bytes else None)
        self.one_row_steps = 0  # steps the one-row graph ran
        self.threads: int | None = None  # the thread count the graphs were compiled under (set by the warm-up)
        self.warming = False
        self.failure: str | None = None  # why compiling failed during the warm-up (then the engine serves eagerly)
        self.eager_calls = 0  # calls that ran eagerly after the warm-up because of the thread count

    def __call__(self, **inputs: Any) -> Any:
        if "inputs_embeds" in inputs:  # a soft prompt's virtual tokens, computed once per task version: eager
            return self.model(**inputs)
        if self.warming:
            if self.failure is None:
                self.threads = torch.get_num_threads()
                try:
                    return self._run(inputs, min_rows=0)
                except Exception as exc:  # e.g. the C++ compiler failed: the same step runs eagerly
                    log.debug("compiling the forward pass failed", exc_info=True)
                    self.failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return self.model(**inputs)
        if self.threads is None or torch.get_num_threads() != self.threads:
            self.eager_calls += 1
            return self.model(**inputs)
        # A step the graph does not cover (its guards fail) runs eagerly rather than compiling: no request waits for
        # a compiler, and the same goes for the in-place attention reader (attention.py).
        with torch.compiler.set_stance(SERVING_STANCE):
            return self._run(inputs)

    def _run(self, inputs: dict[str, Any], min_rows: int | None = None) -> Any:
        """The step through the one-row graph (one token) or the graph of every size."""
        if self.one_row is not None and inputs["input_ids"].shape[-1] == 1:
            step = active_layout().one_query()  # its attention is traced into the graph (attention.attend_one)
            for name in ("pages", "positions"):  # any length of history: one graph
                torch._dynamo.decorators.mark_unbacked(step[name], 1)
            ONE_ROW[0] = True
            self.one_row_steps += 1
            try:
                return self.one_row(**{**inputs, LAYOUT_KWARG: step})
            finally:
                ONE_ROW[0] = False
        _any_size(inputs)
        with in_place_attention(min_rows):
            return self.compiled(**inputs)

    def release(self) -> None:
        """Compiling failed: give back the plain weights the one-row graph would have read."""
        for module in self.model.modules():
            if hasattr(module, "keep_plain"):
                module.plain_weight = None
        self.plain_bytes = 0

    def warm_up(self, run: Any) -> float:
        """Compile by running `run()` (steps of the shapes to serve) with compilation allowed; seconds taken."""
        start = time.perf_counter()
        self.warming = True
        try:
            run()
        except Exception as exc:  # a warm-up request failed: whatever the cause, do not trust the graphs
            self.failure = self.failure or f"a warm-up request failed: {exc}"
        finally:
            self.warming = False
        return time.perf_counter() - start


# A guard on the model itself (its modules, config, class) rather than on a call's inputs, by the name dynamo gives its
# source: the model is the frame's `self`, or `args[0]` where transformers wraps forward in a decorator.
_ON_MODEL = re.compile(r"^(?:(?:dict|type|list)\()*(?:L\[')?(?:self'?\]?|args'?\]?\[0\])(?=[.\[)]|$)")


def _inputs_checked(guards: list[Any]) -> list[bool]:
    """Which of dynamo's guards a call checks: those on the call's inputs and the process's state, not the thousands
    on the model (~7,000 for SmolLM2: its modules' hooks and attributes, its config), which cost ~1 ms a step
    and do not change while the engine serves (`_attributes_fixed`)."""
    return [not _ON_MODEL.match(guard.name) for guard in guards]


def _attributes_fixed(model: torch.nn.Module) -> bool:
    """Whether the model's forward leaves its own attributes as they are: all but a dynamic RoPE, which grows its
    cached length and scaling as sequences grow (transformers' `dynamic_rope_update`); its guards then stay."""
    return not any("dynamic" in str(getattr(module, "rope_type", "")) for module in model.modules())


def _any_size(inputs: dict[str, Any]) -> None:
    """The token count and the kept rows may be any size, 1 included: one graph for every step, where torch would
    otherwise make separate ones for size 1 (and trace the model again for each at start)."""
    for name, dim in (("input_ids", 1), ("position_ids", 1), ("logits_to_keep", 0)):
        value = inputs.get(name)
        if isinstance(value, torch.Tensor):
            torch._dynamo.decorators.mark_unbacked(value, dim)
