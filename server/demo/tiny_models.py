"""Random-weight models and a tokenizer made locally, with no network.

They serve three users: the built-in demo (so `promptswap serve` runs anywhere at once), the
tests (tiny models of two architectures), and the benchmark (real shapes, random weights).
The weights are random: the text they produce is gibberish, but every code path is real.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# A small, varied corpus: enough for a byte-level BPE with a few hundred merges. Non-ASCII text is
# in it on purpose, so that multi-byte characters span several tokens (streaming must not split them).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A soft prompt is a list of learned embeddings.
Prefix tuning learns keys and values for every layer of the attention. Prompt tuning learns
virtual tokens placed before the input. One frozen base model serves many tasks at once.
Translate English to French: cheese => fromage, bread => pain, water => eau, wine => vin.
Classify the sentiment of this review: I loved the film, the acting was wonderful. Positive.
Classify the sentiment of this review: the plot was dull and far too long. Negative.
SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC LIMIT 5;
def add(a, b):\n    return a + b\n\nprint(add(1, 2))
Summarize: the meeting moved to Thursday because the room was booked on Wednesday.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.71 42.
Café, naïve, façade, über, señor, Zürich, São Paulo, 東京, 北京, Москва, Ελλάδα, emoji 🙂🚀.
Questions and answers: Where is the station? Turn left, then walk two hundred metres.
"""

EOS_TOKEN = "<|endoftext|>"
# ChatML, as SmolLM2 and Qwen write it: the tiny Llama (and the random demo) chat through it; the tiny GPT-2
# has none, like GPT-2 itself, so a model without a chat template is tested too.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the built-in corpus and save it with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(arch: str, vocab_size: int, eos_token_id: int, **overrides):
    """A tiny config of one of the two reference architectures.

    `llama`: rotary positions, grouped-query attention. `gpt2`: learned absolute positions.
    The initializer range is wider than the library default so that random logits are decisive
    (near-ties would make greedy decoding fragile to harmless float noise).
    """
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            initializer_range=0.2, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
            pad_token_id=eos_token_id, tie_word_embeddings=False,
        )
        cfg.update(overrides)
        return LlamaConfig(**cfg)
    if arch == "gpt2":
        cfg = dict(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
            initializer_range=0.2, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
        cfg.update(overrides)
        return GPT2Config(**cfg)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected 'llama' or 'gpt2'")


def build_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of `arch` plus the local tokenizer into `out_dir`; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    if arch == "llama":
        tokenizer.chat_template = CHATML
        tokenizer.save_pretrained(str(out))
    config = tiny_config(arch, len(tokenizer), tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return out


def build_model_from_config(out_dir: str | Path, config, seed: int = 0) -> Path:
    """Save random weights for an arbitrary config (e.g. SmolLM2's shape) with the local tokenizer.

    The tokenizer's vocabulary is smaller than a real model's; the model keeps its own vocabulary
    size so that the shapes (and so the cost) are real, and simply never sees the upper ids.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return out
