import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_models_load_and_run(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("Café über 東京", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Café über 東京"
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_llama_fixture_uses_grouped_query_attention(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
