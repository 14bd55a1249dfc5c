"""Storage failures over HTTP (issue 10, items 2 and 3): a full prompt directory is a 507, a read-only
one a 503, each naming the task and the cause in one log line; DELETE frees a full disk; the server
keeps serving the tasks it has."""

from __future__ import annotations

import logging

from tests.api.conftest import upload_multipart
from tests.filesystems import fill, remount_readonly, small_tmpfs


def _generate(client, task: str) -> dict:
    r = client.post("/generate", json={"task": task, "text": "hello there", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_full_and_read_only_prompt_directories(start_server, llama_dir, adapters, tmp_path, caplog):
    with small_tmpfs(tmp_path / "prompts", size_kib=512) as mnt:
        server = start_server(model=str(llama_dir), prompt_dir=mnt)
        try:
            with server.client() as c:
                assert upload_multipart(c, "kept", adapters["prompt_tuning"]).status_code == 201
                before = _generate(c, "kept")
                fill(mnt)
                caplog.set_level(logging.INFO)

                r = upload_multipart(c, "kept", adapters["prefix"])
                assert r.status_code == 507, r.text
                error = r.json()["error"]
                assert error["type"] == "storage_error" and error["param"] == "task"
                assert "'kept'" in error["message"] and "is full" in error["message"]
                logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
                assert len(logged) == 1 and logged[0].exc_info is None, logged  # one line, no traceback
                assert _generate(c, "kept")["text"] == before["text"]  # same connection, same task version
                assert c.get("/prompts/kept").json()["num_virtual_tokens"] == 5

                assert c.delete("/prompts/kept").status_code == 204  # frees the full disk
                assert upload_multipart(c, "again", adapters["prefix"]).status_code == 201
                _generate(c, "again")

                remount_readonly(mnt)
                r = upload_multipart(c, "other", adapters["prompt_tuning"])
                assert r.status_code == 503 and "read-only" in r.json()["error"]["message"], r.text
                r = c.delete("/prompts/again")
                assert r.status_code == 503 and "could not delete task 'again'" in r.json()["error"]["message"]
                _generate(c, "again")
                assert [d["task"] for d in c.get("/prompts").json()["prompts"]] == ["again"]
        finally:
            server.stop()
