"""The poller that keeps a replica's registry converged with a store other replicas write.

Every `interval_s` it asks the backend, cheaply, whether anything changed (S3: one conditional HEAD
of a change marker that every write replaces, answered 304 when nothing moved), and lists the store
only when it did. Every `full_sync_s` it lists anyway, so a change whose marker update was lost
(a writer that crashed between its write and the marker) stays hidden at most that long. When the
store cannot be reached, cached tasks keep serving and the poller retries with exponential backoff.
"""

from __future__ import annotations

import logging
import threading
import time

from prompt_store.errors import StorageError
from prompt_store.registry import PromptRegistry

log = logging.getLogger("prompt_store.sync")


class StorePoller:
    def __init__(self, registry: PromptRegistry, *, interval_s: float = 2.0, full_sync_s: float = 60.0,
                 max_backoff_s: float | None = None) -> None:
        if interval_s <= 0 or full_sync_s <= 0:
            raise ValueError(f"intervals must be > 0, got interval_s={interval_s}, full_sync_s={full_sync_s}")
        self.registry = registry
        self.interval_s = interval_s
        self.full_sync_s = full_sync_s
        self.max_backoff_s = max_backoff_s if max_backoff_s is not None else max(8 * interval_s, 10.0)
        self.failures = 0  # consecutive failed polls (0: the store answers)
        self.last_full_sync: float | None = None  # time.monotonic() of the last complete listing
        self.last_success: float | None = None  # time.monotonic() of the last poll the store answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptswap-store-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def seconds_since_success(self) -> float | None:
        return None if self.last_success is None else time.monotonic() - self.last_success

    def poll_once(self) -> None:
        """One round: a full listing when one is due (or none succeeded yet), else the cheap check first."""
        now = time.monotonic()
        if self.last_success is None:  # once, before the first listing
            check = getattr(self.registry.backend, "check_conditional_writes", None)
            if check is not None:
                check()
        if self.last_full_sync is None or now - self.last_full_sync >= self.full_sync_s:
            self.registry.backend.changed()  # note the marker first: a write after it bumps it again
            self.registry.sync()
            self.last_full_sync = now
        elif self.registry.backend.changed():
            self.registry.sync()

    def _run(self) -> None:
        delay = 0.0  # the first listing at once: /ready waits for it
        while not self._stop.wait(delay):
            try:
                self.poll_once()
            except (StorageError, OSError) as exc:
                # The marker may have been read before the failure: list in full once the store answers.
                self.last_full_sync = None
                self.failures += 1
                delay = min(self.interval_s * 2**self.failures, self.max_backoff_s)
                if self.failures == 1 or self.failures % 10 == 0:
                    log.warning("the prompt store %s cannot be read (%s); cached tasks keep serving; retrying "
                                "in %.1f s (failure %d)", self.registry.location, exc, delay, self.failures)
                continue
            except Exception:  # a bug must not stop convergence for good: log it, keep polling
                self.last_full_sync = None
                self.failures += 1
                delay = min(self.interval_s * 2**self.failures, self.max_backoff_s)
                log.exception("the prompt store poller failed; retrying in %.1f s", delay)
                continue
            self.last_success = time.monotonic()
            if self.failures:
                log.info("the prompt store %s answers again after %d failed polls", self.registry.location,
                         self.failures)
            self.failures = 0
            delay = self.interval_s
