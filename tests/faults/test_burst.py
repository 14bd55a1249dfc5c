"""A burst at three times capacity, on a small --max-running and --max-queue: every accepted request
gets exactly the answer it gets alone, every refused one is a 503 with Retry-After, and the gauges
return to 0."""

from __future__ import annotations

import threading
import time

import httpx

from tests.api.conftest import scrape_metrics, upload_multipart

MAX_RUNNING, MAX_QUEUE = 2, 3
CAPACITY = MAX_RUNNING + MAX_QUEUE


def test_a_burst_at_three_times_capacity(start_server, llama_dir, adapters):
    server = start_server(model=str(llama_dir), max_running=MAX_RUNNING, max_queue=MAX_QUEUE)
    bodies = [{"task": "burst" if i % 2 else None, "text": f"burst number {i} says", "max_new_tokens": 24,
               "ignore_eos": True} for i in range(3 * CAPACITY)]
    try:
        with server.client() as c:
            assert upload_multipart(c, "burst", adapters["prefix"]).status_code == 201
            alone = [c.post("/generate", json=b).json()["text"] for b in bodies]  # one at a time
        answers: list[httpx.Response | None] = [None] * len(bodies)
        go = threading.Barrier(len(bodies))

        def send(i: int) -> None:
            with server.client() as client:
                go.wait()
                answers[i] = client.post("/generate", json=bodies[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

        accepted = [i for i, r in enumerate(answers) if r is not None and r.status_code == 200]
        refused = [r for r in answers if r is not None and r.status_code != 200]
        print(f"burst of {len(bodies)}: {len(accepted)} accepted, {len(refused)} refused")
        assert len(accepted) + len(refused) == len(bodies)
        assert len(accepted) >= CAPACITY  # the first max_running + max_queue always fit
        for i in accepted:
            assert answers[i].json()["text"] == alone[i], f"request {i} changed by the burst"
        for r in refused:
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "overloaded_error"

        with server.client() as c:
            deadline = time.monotonic() + 30
            while True:
                m = scrape_metrics(c)
                if m[("promptswap_queue_depth", ())] == 0 and m[("promptswap_running_requests", ())] == 0:
                    break
                assert time.monotonic() < deadline, "the gauges never returned to 0"
                time.sleep(0.05)
    finally:
        server.stop()
