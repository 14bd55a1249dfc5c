"""A seeded workload: tasks (random soft prompts and prefixes of the right geometry) and requests.

Every system in a run serves the very same `Workload`, so their figures compare like for like.
The tensors are random: the benchmark measures cost, not quality, and the cost of a prompt
depends only on its shape.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from prompt_store.geometry import ModelGeometry

KINDS = ("prompt", "prefix")


@dataclass(frozen=True)
class Task:
    """One task's stored prompt, as PEFT saves it: a single float32 table `[n, width]`.

    kind "prompt": `[n, hidden]` virtual-token embeddings. kind "prefix": `[n, layers*2*kv_dim]`,
    split by `ModelGeometry.split_prefix`.
    """

    name: str
    kind: str
    table: torch.Tensor = field(repr=False)

    @property
    def num_virtual(self) -> int:
        return int(self.table.shape[0])

    def to_safetensors(self) -> bytes:
        """The bytes of a PEFT `adapter_model.safetensors` for this task (one `prompt_embeddings` tensor)."""
        from safetensors.torch import save

        return save({"prompt_embeddings": self.table.contiguous()}, metadata={"format": "pt"})

    def prefix_kv(self, geometry: ModelGeometry) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values), each `[kv_heads, n, head_dim]`: the PEFT split of a prefix."""
        if self.kind != "prefix":
            raise ValueError(f"task {self.name!r} is a {self.kind}, not a prefix")
        keys, values = geometry.split_prefix(self.table)
        return [(keys[layer], values[layer]) for layer in range(geometry.num_layers)]


@dataclass(frozen=True)
class Request:
    id: int
    task: str | None
    text: str
    num_text_tokens: int  # what the tokenizer makes of `text` (informational)
    max_new_tokens: int
    arrival_s: float  # seconds after the start of the run


@dataclass(frozen=True)
class Workload:
    tasks: dict[str, Task]
    requests: tuple[Request, ...]

    def without_tasks(self) -> Workload:
        """The same texts, lengths and arrivals with no task at all: the no-prompts ceiling."""
        return Workload({}, tuple(replace(r, task=None) for r in self.requests))

    def task_of(self, request: Request) -> Task | None:
        return None if request.task is None else self.tasks[request.task]

    @property
    def total_new_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 64
    num_tasks: int = 16
    no_task_fraction: float = 0.125  # "a few requests with no task"
    virtual_tokens: tuple[int, int] = (8, 64)  # inclusive range of num_virtual_tokens per task
    text_len: tuple[int, int] = (32, 128)  # inclusive range of text length in tokens
    max_new_tokens: tuple[int, int] = (64, 64)
    arrival: str = "burst"  # "burst": all at time 0; "poisson": exponential gaps at `rate`
    rate: float | None = None  # requests per second, for "poisson"
    seed: int = 0
    prefix_std: float = 1.0  # random keys/values have unit scale, like a layer's normalised activations

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_tasks < 0:
            raise ValueError("need at least one request and a non-negative number of tasks")
        if not 0.0 <= self.no_task_fraction <= 1.0:
            raise ValueError(f"no_task_fraction must be in [0, 1], got {self.no_task_fraction}")
        for name in ("virtual_tokens", "text_len", "max_new_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be a range 1 <= low <= high, got {(low, high)}")
        if self.arrival not in ("burst", "poisson"):
            raise ValueError(f"arrival must be 'burst' or 'poisson', got {self.arrival!r}")
        if self.arrival == "poisson" and not (self.rate and self.rate > 0):
            raise ValueError("poisson arrivals need a positive rate")


def make_tasks(spec: WorkloadSpec, geometry: ModelGeometry, embed_std: float) -> dict[str, Task]:
    """`num_tasks` tasks, kinds alternating so that half are soft prompts and half prefixes."""
    gen = torch.Generator().manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tasks = {}
    for i in range(spec.num_tasks):
        kind = KINDS[i % 2]
        n = rng.randint(*spec.virtual_tokens)
        std = embed_std if kind == "prompt" else spec.prefix_std
        table = torch.randn(n, geometry.width_for(kind), generator=gen) * std
        name = f"task{i:02d}-{kind}"
        tasks[name] = Task(name, kind, table)
    return tasks


def random_text(tokenizer, vocab: list[int], num_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Text of random vocabulary tokens, about `num_tokens` long once the tokenizer encodes it.

    Decoding then re-encoding merges some tokens, so we add tokens until the text is long enough
    and cut it back; returns the text and its encoded length (every system encodes the same text).
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    ids: list[int] = []
    encoded: list[int] = []
    while len(encoded) < num_tokens:
        ids += [rng.choice(vocab) for _ in range(num_tokens - len(encoded))]
        encoded = encode(tokenizer.decode(ids))
    text = tokenizer.decode(encoded[:num_tokens])
    return text, len(encode(text))


def plain_vocab(tokenizer) -> list[int]:
    """Token ids that decode on their own to printable text (no control bytes, no half characters)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        piece = tokenizer.decode([i])
        if i not in special and piece and piece.isprintable() and "\ufffd" not in piece:
            out.append(i)
    return out


def sample_text(tokenizer, num_tokens: int, seed: int) -> tuple[str, int]:
    """One random text of about `num_tokens` tokens (the TTFT mode's single request)."""
    return random_text(tokenizer, plain_vocab(tokenizer), num_tokens, random.Random(seed))


def arrivals(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    if spec.arrival == "burst":
        return [0.0] * spec.num_requests
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        out.append(t)
        t += rng.expovariate(spec.rate)
    return out


def assign_tasks(spec: WorkloadSpec, names: list[str], rng: random.Random) -> list[str | None]:
    """A few requests get no task; the rest cover the tasks evenly, in shuffled order.

    Even coverage is the best case for the grouped-by-task baseline: a fair, not a weak, opponent.
    """
    num_none = round(spec.num_requests * spec.no_task_fraction) if names else spec.num_requests
    num_tasked = spec.num_requests - num_none
    labels: list[str | None] = [names[i % len(names)] for i in range(num_tasked)] if names else []
    labels += [None] * num_none
    rng.shuffle(labels)
    return labels


def make_workload(spec: WorkloadSpec, geometry: ModelGeometry, embed_std: float, tokenizer) -> Workload:
    """The whole workload, a pure function of `spec`, the model's geometry and its tokenizer."""
    tasks = make_tasks(spec, geometry, embed_std)
    rng = random.Random(spec.seed + 1)
    labels = assign_tasks(spec, list(tasks), rng)
    times = arrivals(spec, rng)
    vocab = plain_vocab(tokenizer)
    requests = []
    for i, (task, arrival_s) in enumerate(zip(labels, times, strict=True)):
        text, n_tokens = random_text(tokenizer, vocab, rng.randint(*spec.text_len), rng)
        requests.append(Request(i, task, text, n_tokens, rng.randint(*spec.max_new_tokens), arrival_s))
    return Workload(tasks, tuple(requests))


def embedding_std(model) -> float:
    """The scale of the model's token embeddings: random soft prompts should look like real inputs."""
    return float(model.get_input_embeddings().weight.detach().float().std())
