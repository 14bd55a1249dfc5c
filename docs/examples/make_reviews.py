"""Write docs/examples/reviews.jsonl: short film reviews labelled "thumbs up" or "thumbs down".

The labels are ones SmolLM2-135M-Instruct would not produce by itself (asked for the sentiment, it
answers "Positive" or a sentence), so the README's trained task plainly changes its answer. The reviews
are made from phrase lists with a fixed seed: `python docs/examples/make_reviews.py` rewrites the same file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["The film", "This movie", "The sequel", "The documentary", "The new series", "The ending",
            "The acting", "The soundtrack", "The script", "The director's latest"]
GOOD = ["was wonderful", "made me smile all evening", "is the best thing I have seen this year",
        "kept me gripped from start to finish", "was moving and beautifully shot", "deserves every award",
        "was a delight", "felt fresh and clever", "had me laughing out loud", "is worth seeing twice"]
BAD = ["was dull", "made me want to leave early", "is the worst thing I have seen this year",
       "dragged on far too long", "was badly written and flat", "wasted a great cast",
       "was a chore to sit through", "felt stale and predictable", "had no laughs at all", "is not worth your time"]
EXTRAS = ["", " Honestly.", " I mean it.", " My friends agreed.", " What a night."]


def reviews(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        extra = rng.choice(EXTRAS)
        text = f"{rng.choice(SUBJECTS)} {rng.choice(GOOD if good else BAD)}.{extra}"
        rows.append({"input": text, "output": "thumbs up" if good else "thumbs down"})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("reviews.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in reviews(240)))
    print(f"wrote {out}")
