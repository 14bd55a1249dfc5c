"""Log-probabilities as each API writes them, from the engine's TokenLogprob entries (one place).

A token's text is `tokenizer.decode([id])`: a piece of a multi-byte character shows as U+FFFD there, and
its `bytes` (OpenAI's chat shape) are the token's own UTF-8 bytes where it has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine.results import TokenLogprob


def _text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def native(entries: Sequence[TokenLogprob], tokenizer: Any) -> list[dict]:
    """/generate: [{token_id, token, logprob, top: [{token_id, token, logprob}, ...]}, ...]."""
    return [{"token_id": e.token_id, "token": _text(tokenizer, e.token_id), "logprob": e.logprob,
             "top": [{"token_id": t, "token": _text(tokenizer, t), "logprob": lp} for t, lp in e.top]}
            for e in entries]


def completion(token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], tokenizer: Any,
               offset: int = 0) -> dict:
    """/v1/completions (OpenAI's legacy shape): tokens, token_logprobs, top_logprobs ({token: logprob}, the
    chosen token among them, as vLLM does) and text_offset (where each token starts in the choice's text).
    An entry of None (the first prompt token with `echo`) has no log-probability."""
    tokens = [_text(tokenizer, t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top: list[dict[str, float] | None] = []
    for entry in entries:
        if entry is None:
            top.append(None)
            continue
        alternatives = {_text(tokenizer, t): lp for t, lp in entry.top}
        alternatives.setdefault(_text(tokenizer, entry.token_id), entry.logprob)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [e.logprob if e is not None else None for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def chat(entries: Sequence[TokenLogprob], tokenizer: Any) -> dict:
    """/v1/chat/completions: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token_id: int, logprob: float) -> dict:
        text = _text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}
