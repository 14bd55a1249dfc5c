"""The documentation's code examples, read from README.md and docs/*.md.

Every ```python and ```bash block is an example. One that talks to a server (it names `localhost:8000` or
`127.0.0.1:8000`, or a python block that uses `client.`) runs against a real `promptswap serve`
(tests/docs/test_examples_run.py); every other block, and any block that cannot run, carries a marker on the
line before its fence that says why:

    <!-- not run: needs docker -->

Every block compiles (python) or passes `bash -n` (bash) either way (tests/docs/test_examples_compile.py).

Documented outputs are checked where an example shows them:
- python: the comment lines that end the block (`# ...`, one per printed line), or, without them, the comment of a
  last `print(...)  # ...` line;
- bash: the comment lines right after a `curl` command (continued lines are joined), against that call's body.
`...` in a documented output stands for any text. An example that shows no output must succeed: curl runs with
`--fail-with-body` (an HTTP error fails it), python raises nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash"}

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<why>\S.*?)\s*-->\s*$")
SERVER = re.compile(r"(?:localhost|127\.0\.0\.1):8000\b")
USES_CLIENT = re.compile(r"\bclient\.")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # the fence's line, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def talks_to_server(self) -> bool:
        return bool(SERVER.search(self.code) or (self.lang == "python" and USES_CLIENT.search(self.code)))

    @property
    def runs(self) -> bool:
        return self.talks_to_server and self.not_run is None


def read_examples(page: Path) -> list[Example]:
    lines = page.read_text().split("\n")
    examples, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening["indent"], opening["lang"]
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != f"{indent}```":
            end += 1
        assert end < len(lines), f"{page}:{i + 1}: a code block that never closes"
        if lang in LANGUAGES:
            before = next((line for line in reversed(lines[:i]) if line.strip()), "")
            marker = NOT_RUN.match(before)
            code = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
            examples.append(Example(page, i + 1, lang, code, marker["why"] if marker else None))
        i = end + 1
    return examples


def all_examples() -> list[Example]:
    return [example for page in PAGES for example in read_examples(page)]


def for_port(code: str, port: int) -> str:
    """The example as run against the test's server."""
    return SERVER.sub(f"127.0.0.1:{port}", code)


def _comment(line: str) -> str:
    return line[1:].removeprefix(" ")


def python_expected_output(code: str) -> list[str] | None:
    """The lines the block documents that it prints, or None where it documents none."""
    lines = code.rstrip("\n").split("\n")
    tail: list[str] = []
    while lines and lines[-1].startswith("#"):
        tail.insert(0, _comment(lines.pop()))
    if tail:
        return tail
    last = lines[-1] if lines else ""
    inline = re.match(r"^print\(.*\)\s+#\s(?P<out>.*)$", last)
    return [inline["out"]] if inline else None


def bash_expected_outputs(code: str) -> dict[int, str]:
    """{index of the curl call (0-based, in order): its documented body} for the calls that document one."""
    expected: dict[int, str] = {}
    calls, comment, previous_is_command = 0, [], False
    for line in [*code.split("\n"), ""]:
        if line.startswith("#") and (comment or previous_is_command) and calls:
            comment.append(_comment(line).lstrip())
            continue
        if comment:
            expected[calls - 1] = "".join(comment)
            comment = []
        calls += len(re.findall(r"(?:^|[;&|(]\s*)curl\s", line))
        previous_is_command = bool(line.strip()) and not line.startswith("#")
    return expected


def matches(documented: str, actual: str) -> bool:
    """`...` in the documented text stands for any text; the rest must be equal (surrounding blanks aside)."""
    pattern = ".*?".join(re.escape(part) for part in documented.strip().split("..."))
    return re.fullmatch(pattern, actual.strip(), flags=re.DOTALL) is not None
