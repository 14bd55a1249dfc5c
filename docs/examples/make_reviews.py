"""Write the README's two example datasets (phrase lists, fixed seeds: running it rewrites the same files):

- docs/examples/reviews.jsonl: short film and restaurant reviews labelled "thumbs up" or "thumbs down";
- docs/examples/topics.jsonl: the same kind of reviews labelled by what they review, "screen" or "plate".

The labels are ones SmolLM2-135M-Instruct would not produce by itself (asked for the sentiment, it answers
"Positive" or a sentence), so the README's trained tasks plainly change its answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["The film", "This movie", "The sequel", "The documentary", "The new series", "The ending",
            "The acting", "The soundtrack", "The script", "The director's latest"]
DISHES = ["The soup", "This restaurant", "The pasta", "The tasting menu", "The new bistro", "The dessert",
          "The service", "The wine list", "The curry", "The chef's special"]
GOOD = ["was wonderful", "made me smile all evening", "is the best thing I have seen this year",
        "kept me gripped from start to finish", "was moving and beautifully shot", "deserves every award",
        "was a delight", "felt fresh and clever", "had me laughing out loud", "is worth seeing twice"]
BAD = ["was dull", "made me want to leave early", "is the worst thing I have seen this year",
       "dragged on far too long", "was badly written and flat", "wasted a great cast",
       "was a chore to sit through", "felt stale and predictable", "had no laughs at all", "is not worth your time"]
EXTRAS = ["", " Honestly.", " I mean it.", " My friends agreed.", " What a night."]


def reviews(n: int, seed: int = 0, label: str = "sentiment", subjects: list[str] = SUBJECTS) -> list[dict[str, str]]:
    """`label` "sentiment": thumbs up/down; "topic": screen (films) or plate (food), half of each."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        food = label == "topic" and i % 4 >= 2
        extra = rng.choice(EXTRAS)
        text = f"{rng.choice(DISHES if food else subjects)} {rng.choice(GOOD if good else BAD)}.{extra}"
        topic = "plate" if food else "screen"
        rows.append({"input": text, "output": topic if label == "topic" else "thumbs up" if good else "thumbs down"})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, rows in (("reviews.jsonl", reviews(240)), ("topics.jsonl", reviews(240, seed=1, label="topic"))):
        (here / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {here / name}")
