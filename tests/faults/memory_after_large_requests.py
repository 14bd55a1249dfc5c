"""Does the server's memory come back after large requests? (issue 10: within 10% of its level before.)

Run by hand, not by pytest (it takes a minute and measures a whole process):

    python -m tests.faults.memory_after_large_requests [--model DIR_OR_NAME] [--rounds 3]

It starts `promptswap serve` (the offline demo unless --model is given), warms it with small requests,
reads the process's resident memory (VmRSS), then sends rounds of large requests: 3 MiB texts (refused
by the cheap length bound), texts just under that bound (tokenized in full, then refused as too long
for the context) and a /generate/batch of such texts, four clients at once. After small requests
again it reads VmRSS once more, prints both and the ratio, and exits 1 if memory grew by over 10%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.serve_process import start_serve_process

MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def small_requests(url: str, n: int = 8) -> None:
    for i in range(n):
        r = httpx.post(f"{url}/generate", json={"text": f"hello number {i}", "max_new_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text


def large_round(url: str, words: int) -> list[int]:
    bodies = [
        ("/generate", {"text": "x" * (3 * MiB), "max_new_tokens": 2}),
        ("/generate", {"text": "word " * words, "max_new_tokens": 2}),
        ("/generate/batch", {"requests": [{"text": "word " * words}] * 4}),
        ("/generate", {"text": "y" * (3 * MiB), "max_new_tokens": 2, "stream": True}),
    ]
    statuses: list[int] = []

    def send(path: str, body: dict) -> None:
        statuses.append(httpx.post(f"{url}{path}", json=body, timeout=300).status_code)

    threads = [threading.Thread(target=send, args=pb) for pb in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or hub id (default: the offline demo)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, default=10_000,
                        help="words in the long texts: more tokens than the context, fewer than the cheap bound")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        flags = ("--log-level", "warning", "--cache-dir", str(Path.home() / ".cache" / "promptswap"))
        proc, url = start_serve_process(args.model, Path(tmp), *flags)
        try:
            small_requests(url)
            time.sleep(1)
            before = rss_bytes(proc.pid)
            for round_ in range(args.rounds):
                statuses = large_round(url, args.words)
                print(f"round {round_ + 1}: statuses {sorted(statuses)}, RSS {rss_bytes(proc.pid) / MiB:.0f} MiB")
            small_requests(url)
            time.sleep(2)
            after = rss_bytes(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    ratio = after / before
    print(f"RSS before large requests {before / MiB:.0f} MiB, after {after / MiB:.0f} MiB: {ratio:.3f}x")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
