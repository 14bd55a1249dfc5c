"""`promptswap train --server` asks the server before training: a server that cannot be reached, is not a
promptswap server, refuses the admin token or serves read-only prompts is one line and exit 2, with nothing
trained; the check itself writes nothing."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.process.cli import main
from server.train.upload import check_server
from tests.api.conftest import LiveServer
from tests.serve_process import _free_port
from tests.train.test_train import write_examples

ADMIN = "check-admin-token"


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    live = LiveServer(Settings(model=str(llama_dir), admin_token=ADMIN, api_token="check-api-token",
                               prompt_dir=tmp_path_factory.mktemp("prompts"), cache_dir=tmp_path_factory.mktemp("c")))
    yield live
    live.stop()


def train_to(tmp_path, llama_dir, url: str, *flags: str) -> int:
    data = write_examples(tmp_path / "d.jsonl", "Positive", n=4)
    return main(["train", "--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet",
                 "--server", url, "--task", "checked", *flags])


def refused(capsys, tmp_path) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("promptswap train: --server: ")
    assert not (tmp_path / "out").exists()  # refused before training: nothing written
    return lines[0]


def test_an_unreachable_server_fails_before_training(tmp_path, llama_dir, capsys, monkeypatch):
    monkeypatch.delenv("PROMPTSWAP_ADMIN_TOKEN", raising=False)
    assert train_to(tmp_path, llama_dir, f"http://127.0.0.1:{_free_port()}") == 2
    line = refused(capsys, tmp_path)
    assert "could not reach" in line and "is the server running?" in line


def test_a_missing_or_wrong_admin_token_fails_before_training(tmp_path, llama_dir, capsys, monkeypatch, server):
    monkeypatch.delenv("PROMPTSWAP_ADMIN_TOKEN", raising=False)
    assert train_to(tmp_path, llama_dir, server.url) == 2
    assert "needs an admin token" in refused(capsys, tmp_path)
    assert train_to(tmp_path, llama_dir, server.url, "--admin-token", "check-api-token") == 2  # the API token: no
    line = refused(capsys, tmp_path)
    assert "refused the admin token" in line and "PROMPTSWAP_ADMIN_TOKEN" in line


def test_a_url_that_is_no_promptswap_server_fails_before_training(tmp_path, llama_dir, capsys, server):
    assert train_to(tmp_path, llama_dir, f"{server.url}/not-here", "--admin-token", ADMIN) == 2
    assert "/not-here/health answered 404; is" in refused(capsys, tmp_path)


def test_a_read_only_server_fails_before_training(tmp_path, llama_dir, capsys, tmp_path_factory):
    read_only = LiveServer(Settings(model=str(llama_dir), read_only_prompts=True,
                                    prompt_dir=tmp_path_factory.mktemp("fixed"), cache_dir=tmp_path / "cache"))
    capsys.readouterr()  # the server's own loading lines
    try:
        assert train_to(tmp_path, llama_dir, read_only.url) == 2
    finally:
        read_only.stop()
    line = refused(capsys, tmp_path)
    assert "answered 405" in line and "--read-only-prompts" in line


def test_the_check_passes_with_the_admin_token_and_writes_nothing(server):
    check_server(server.url + "/", "checked", ADMIN)
    with server.client(headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        assert client.get("/prompts/checked").status_code == 404
        assert client.get("/prompts").json()["prompts"] == []
