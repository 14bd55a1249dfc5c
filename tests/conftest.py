"""Session fixtures: tiny random-weight models of two architectures, built offline; the quick tier's rule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.demo.tiny_models import build_tiny_model
from server.engine import compiled

# The compiled step (server/engine/compiled.py) compiles the model an engine serves, at its start: seconds to a
# minute a model on this machine kind, for hundreds of engines. So the suite serves eagerly: server processes it
# starts get PROMPTSWAP_COMPILE=false, engines in this process the fixture below; the engines of
# tests/engine/test_compiled.py compile. PROMPTSWAP_TEST_COMPILE=1 runs the whole suite compiled instead.
COMPILE_ALL = os.environ.get("PROMPTSWAP_TEST_COMPILE") == "1"
if not COMPILE_ALL:
    os.environ.setdefault("PROMPTSWAP_COMPILE", "false")
REAL_UNUSABLE_REASON = compiled.unusable_reason  # the `compiling` fixture of test_compiled.py puts it back


@pytest.fixture(scope="session", autouse=True)
def _eager_engines():
    """Engines built in this process serve eagerly (see above), session fixtures' included."""
    if COMPILE_ALL:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, "unusable_reason", lambda *_: "the test suite serves eagerly (tests/conftest.py)")
        yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Llama-style: rotary positions, grouped-query attention (4 query heads, 2 key/value heads)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """GPT-2-style: learned absolute position embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def model_dir(request, llama_dir, gpt2_dir):
    """Each test that takes this runs once per architecture."""
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]



# The quick tier: `python -m pytest -m "not slow"` runs the logic tests in under a minute; CI runs them all. The rule
# is here, so that a new test falls in the right tier without a word; a module that is mostly slow says so itself
# (`pytestmark = pytest.mark.slow`), and so does a single test over ~1 s (`@pytest.mark.slow`).
#
# Every test under these folders: they start server processes, train, load the real model, run benchmarks, faults
# and soaks.
SLOW_FOLDERS = {"benchmarks", "faults", "real_model", "replicas", "train"}
# Tests that take `model_dir` run on both tiny architectures; the quick tier keeps the Llama-style one (every task
# kind, PEFT fidelity included) and leaves the GPT-2-style one to the full suite.
SLOW_ARCHITECTURES = {"gpt2"}
# HTTP end to end: a test over a live uvicorn server (the `start_server` fixture, `llama_server` included) is
# slow, but for the request schemas' own checks.
QUICK_LIVE_SERVER_MODULES = {"api/test_validation.py"}
# Single slow tests in modules that others were editing when the tiers were drawn (mark them in place instead).
SLOW_TESTS = {
    "api/test_validation.py::test_every_list_has_a_cap",  # a second server
    "engine/test_cpu_linear.py::test_the_capacity_reaches_onednn_when_the_service_imports_the_engine",  # ~18 s
}

TESTS = Path(__file__).parent


def _is_slow(item: pytest.Item) -> bool:
    try:
        path = item.path.relative_to(TESTS).as_posix()
    except ValueError:
        return False
    callspec = getattr(item, "callspec", None)
    return (
        path.split("/")[0] in SLOW_FOLDERS
        or (callspec is not None and callspec.params.get("model_dir") in SLOW_ARCHITECTURES)
        or ("start_server" in item.fixturenames and path not in QUICK_LIVE_SERVER_MODULES)
        or f"{path}::{item.originalname}" in SLOW_TESTS
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
