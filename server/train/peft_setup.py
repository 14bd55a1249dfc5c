"""The PEFT config of each kind `promptswap train` makes, and its default learning rate."""

from __future__ import annotations

from typing import Any, Literal

TrainKind = Literal["prompt", "ptuning", "prefix"]
KINDS: tuple[TrainKind, ...] = ("prompt", "ptuning", "prefix")
# Learning rates that train a usable task from a few hundred examples without tuning (AdamW): a soft
# prompt's embeddings move slowly and take a large rate; P-tuning's encoder (an MLP) and prefix tables
# are many more parameters and take smaller ones.
DEFAULT_LR: dict[TrainKind, float] = {"prompt": 3e-2, "ptuning": 3e-3, "prefix": 1e-2}


def peft_config(kind: TrainKind, num_virtual_tokens: int, *, model_path: str, init_text: str | None = None,
                encoder_hidden_size: int | None = None, prefix_projection: bool = False) -> Any:
    """PROMPT_TUNING (random or text init), P_TUNING (an MLP encoder) or PREFIX_TUNING (tables, or a projection)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType

    common = {"task_type": TaskType.CAUSAL_LM, "num_virtual_tokens": num_virtual_tokens}
    if kind == "prompt":
        if init_text is not None:
            return PromptTuningConfig(**common, prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=init_text, tokenizer_name_or_path=model_path)
        return PromptTuningConfig(**common, prompt_tuning_init=PromptTuningInit.RANDOM)
    if kind == "ptuning":
        extra = {"encoder_hidden_size": encoder_hidden_size} if encoder_hidden_size else {}
        return PromptEncoderConfig(**common, **extra)
    extra = {"encoder_hidden_size": encoder_hidden_size} if prefix_projection and encoder_hidden_size else {}
    return PrefixTuningConfig(**common, prefix_projection=prefix_projection, **extra)
