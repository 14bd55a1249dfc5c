"""Turn a request's generated tokens into text as they come: whole characters, stop strings honoured.

Byte-level tokenizers split multi-byte characters over several tokens; decoding a token alone
gives U+FFFD. Like TGI and vLLM we decode a short window of earlier tokens with the new ones and
emit only what has become whole. Text that could be the start of a stop string is held back
until it is known not to be one, so a stream never shows text past a stop.
"""

from __future__ import annotations

# Decoding from a few tokens before the new ones lets tokenizers that drop a leading space
# (SentencePiece) decode the continuation exactly as they would inside the whole text.
_CONTEXT_TOKENS = 5


class IncrementalText:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self.text = ""  # all whole text decoded so far (cut at a stop string once one is seen)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release everything held back (an incomplete character stays out)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            search_from = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        piece = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest
