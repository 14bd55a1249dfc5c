"""Every ```python block of README.md and docs/*.md compiles, every ```bash block passes `bash -n`, and every block
either runs against a real server (tests/docs/test_examples_run.py) or says why not (tests/docs/examples.py)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.docs.examples import ADAPTERS, ROOT, all_examples

EXAMPLES = all_examples()


def test_the_pages_have_examples():
    pages = {example.page.name for example in EXAMPLES}
    assert {"README.md", "getting-started.md", "api.md", "structured-output-and-tools.md"} <= pages
    assert sum(example.runs for example in EXAMPLES) >= 25


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.lang == "python"], ids=lambda e: e.id)
def test_python_examples_compile(example):
    compile(example.code, example.id, "exec")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.lang == "bash"], ids=lambda e: e.id)
def test_bash_examples_parse(example):
    result = subprocess.run(["bash", "-n"], input=example.code, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_every_example_runs_or_says_why_not(example):
    assert example.runs or example.not_run, (
        f"{example.id} neither talks to the server, trains nor uses the docs' adapters, and does not say why it is "
        "not run: put `<!-- not run: <why> -->` on the line before its fence")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.uses_tasks], ids=lambda e: e.id)
def test_the_tasks_a_block_uses_are_ones_the_docs_train(example):
    assert set(example.uses_tasks) <= ADAPTERS.keys(), f"{example.id}: the tests make only {sorted(ADAPTERS)}"


def _slugs(page) -> set[str]:
    """The anchors of a page's headings, as GitHub and mkdocs write them."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_the_readmes_links_lead_somewhere():
    """mkdocs checks the docs pages' links (`mkdocs build --strict`); the README is not one of them, so here."""
    readme = ROOT / "README.md"
    for target in re.findall(r"\]\(([^)\s]+)\)", readme.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        page = (ROOT / path) if path else readme
        assert page.exists(), target
        if anchor:
            assert anchor in _slugs(page), target
