"""The documentation's code examples, read from README.md and docs/*.md.

Every ```python and ```bash block is an example. One that talks to a server (it names `localhost:8000` or
`127.0.0.1:8000`, or a python block that uses `client.`) runs against a real `promptswap serve`
(tests/docs/test_examples_run.py), and so do a `promptswap train` command on the demo model (shortened: a few of
its examples, one epoch) and a block that works on the adapters the docs' examples make (it names one of their
directories, ADAPTERS); every other block, and any block that cannot run, carries a marker on the line before its
fence that says why:

    <!-- not run: needs docker -->

Blocks run in a reader's working directory: the adapters the docs' own examples make are there, made the same way
by the tests. A block that uses a task an earlier block uploads says which on the line before its
fence, and the tests upload it from those adapters first:

    <!-- uses tasks: reviews, topics -->

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
USES_TASKS = re.compile(r"^\s*<!--\s*uses tasks:\s*(?P<tasks>[\w-]+(?:\s*,\s*[\w-]+)*)\s*-->\s*$")
SERVER = re.compile(r"(?:localhost|127\.0\.0\.1):8000\b")
USES_CLIENT = re.compile(r"\bclient\.")

# The adapters the docs' own examples make, as a reader's working directory then holds them: the task each is
# uploaded as -> (its directory, the page whose example makes it). The tests make each from that example, quickly.
ADAPTERS = {
    "reviews": ("adapters/reviews", "tasks-and-prompts.md"),
    "topics": ("adapters/topics", "tasks-and-prompts.md"),
    "sentiment": ("sentiment-adapter", "getting-started.md"),
}


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # the fence's line, 1-based
    lang: str
    code: str
    not_run: str | None  # the marker's reason
    uses_tasks: tuple[str, ...] = ()  # the tasks of a `uses tasks:` marker
    output: str | None = None  # a plain ``` block right after it: what it printed, as documented

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"

    @property
    def talks_to_server(self) -> bool:
        return bool(SERVER.search(self.code) or (self.lang == "python" and USES_CLIENT.search(self.code)))

    @property
    def trains(self) -> bool:
        """One `promptswap train` command on the demo model (no `--model`), continued lines joined, and nothing else."""
        commands = [line for line in self.code.replace("\\\n", " ").split("\n")
                    if line.strip() and not line.lstrip().startswith("#")]
        return (self.lang == "bash" and len(commands) == 1 and commands[0].split()[:2] == ["promptswap", "train"]
                and "--model" not in commands[0].split())

    @property
    def runs(self) -> bool:
        return (self.talks_to_server or self.trains or self.uses_adapters) and self.not_run is None

    def makes(self, directory: str) -> bool:
        """It writes that adapter directory: a training's `--out`, or PEFT's `save_pretrained`."""
        if self.trains:
            return re.search(rf"--out\s+{re.escape(directory)}(?:\s|$)", self.code) is not None
        return self.lang == "python" and f'save_pretrained("{directory}")' in self.code

    @property
    def uses_adapters(self) -> bool:
        return bool(self.uses_tasks) or any(directory in self.code for directory, _ in ADAPTERS.values())


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
            marker, uses = NOT_RUN.match(before), USES_TASKS.match(before)
            code = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end]) + "\n"
            tasks = tuple(task.strip() for task in uses["tasks"].split(",")) if uses else ()
            examples.append(Example(page, i + 1, lang, code, marker["why"] if marker else None, tasks,
                                    _output_after(lines, end, indent)))
        i = end + 1
    return examples


def _output_after(lines: list[str], end: int, indent: str) -> str | None:
    """The plain ``` block that follows the block closing at `end` (blank lines between), if one does."""
    start = next((j for j in range(end + 1, len(lines)) if lines[j].strip()), None)
    if start is None or lines[start].rstrip() != f"{indent}```":
        return None
    close = next((j for j in range(start + 1, len(lines)) if lines[j].rstrip() == f"{indent}```"), None)
    assert close is not None, f"line {start + 1}: a code block that never closes"
    return "\n".join(line.removeprefix(indent) for line in lines[start + 1:close]) + "\n"


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
