"""Scoring choices instead of generating: one object attached to the request (`Sequence.scoring`).

First the text is computed as any prompt is; its last logits give each choice's first token. Then one
step computes every choice's other tokens at once, each choice in pages of its own after the text's,
reading the task prefix and the text's pages (computed once, shared by every choice). Log-probabilities
come from the raw next-token distribution. The scheduler asks this object for its pages, the runner
for its packing, the logits processor for its scoring; the result is every choice, most likely first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.attention import PageList, PrefillChunk, Segment, page_views
from server.engine.pages import pages_for, row_list
from server.engine.results import ChoiceScore, ChoiceScores, Usage

if TYPE_CHECKING:
    from server.engine.pages import PagePool
    from server.engine.sequence import Sequence


@dataclass(slots=True)
class ChoiceScoring:
    choices: tuple[tuple[str, tuple[int, ...]], ...]  # each choice's text and tokens
    logprobs: list[list[float]] = field(default_factory=list)  # per choice, its tokens' so far
    pages: list[list[int]] = field(default_factory=list)  # per choice, the pages of its tokens but the last

    # -- what the scheduler asks ------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        """Tokens the choices' step computes: every choice's tokens but its last (which no logits follow)."""
        return sum(len(ids) - 1 for _, ids in self.choices)

    def pages_needed(self) -> int:
        """Pages the choices' step holds (each choice its own)."""
        return sum(pages_for(len(ids) - 1) for _, ids in self.choices)

    @property
    def due(self) -> bool:
        """The text is computed (its first tokens scored) and some choice has more than one token."""
        return bool(self.logprobs) and self.tokens > 0

    def take_pages(self, pages: list[int]) -> None:
        """Split `pages_needed()` fresh pages among the choices."""
        self.pages = []
        for _, ids in self.choices:
            size = pages_for(len(ids) - 1)
            self.pages.append(pages[:size])
            pages = pages[size:]

    def release(self, pool: PagePool) -> None:
        for pages in self.pages:
            pool.release(pages)
        self.pages = []

    def restart(self) -> None:
        """Preempted: the text is computed again, then the choices."""
        self.logprobs = []

    # -- what the runner asks ---------------------------------------------------------------------

    def pack(self, seq: Sequence, start: int, ids: list[int], positions: list[int], rows: list[int],
             prefills: list[PrefillChunk], device: torch.device) -> list[int]:
        """Pack the choices' step: each choice's tokens but its last, at the positions after the text, written
        to the choice's own pages, each reading the task prefix, the text's pages and its own. Returns the packed
        offsets of all those tokens: their logits score each choice's next token."""
        text = len(seq.prompt_ids)
        first = seq.num_virtual + text
        head = [Segment(seq.prefix.pages, 0, seq.prefix.positions)] if seq.prefix is not None else []
        kept: list[int] = []
        for (_, choice), pages in zip(self.choices, self.pages, strict=True):
            m = len(choice) - 1
            if m == 0:
                continue  # a one-token choice was scored by the text's last logits alone
            plist = PageList((*head, Segment(seq.pages, seq.num_virtual, text), Segment(pages, first)))
            view_pages, held = page_views([plist], device)
            prefills.append(PrefillChunk(start + len(kept), m, first, view_pages[0], held[0]))
            ids.extend(choice[:-1])
            positions.extend(range(first, first + m))
            rows.extend(row_list(pages, 0, m))
            kept.extend(range(start + len(kept), start + len(kept) + m))
        return kept

    # -- what the logits processor asks -----------------------------------------------------------

    def score(self, rows: torch.Tensor, choices_step: bool) -> bool:
        """Take this step's logits rows; True when every choice is scored. The text's last row gives each
        choice's first token; the choices' step gives, per choice, one row for each of its other tokens."""
        if not len(rows):
            return False  # a chunk of the text, not its last
        logprobs = torch.log_softmax(rows.float(), dim=-1)  # [k, vocab]
        if not choices_step:
            firsts = torch.tensor([ids[0] for _, ids in self.choices], device=logprobs.device)
            self.logprobs = [[lp] for lp in logprobs[0, firsts].tolist()]
            return self.tokens == 0
        row = 0
        for (_, ids), scored in zip(self.choices, self.logprobs, strict=True):
            following = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)  # empty: a 1-token choice
            scored.extend(logprobs[row + torch.arange(len(following), device=logprobs.device), following].tolist())
            row += len(following)
        return True

    # -- the result -------------------------------------------------------------------------------

    def result(self, task: str | None, prompt_tokens: int, virtual_tokens: int, cached_tokens: int) -> ChoiceScores:
        """Every choice with its log-probability, most likely first (ties keep the request's order)."""
        assert len(self.logprobs) == len(self.choices)
        scores = [ChoiceScore(text, sum(lps), sum(lps) / len(lps), len(lps))
                  for (text, _), lps in zip(self.choices, self.logprobs, strict=True)]
        scores.sort(key=lambda score: score.logprob, reverse=True)
        usage = Usage(prompt_tokens, virtual_tokens, self.tokens + len(self.choices), cached_tokens)
        return ChoiceScores(task, tuple(scores), usage)
