"""Session fixtures: tiny random-weight models of two architectures, built offline."""

from __future__ import annotations

import pytest

from server.demo.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Llama-style: rotary positions, grouped-query attention (4 query heads, 2 key/value heads)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """GPT-2-style: learned absolute position embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def model_dir(request, llama_dir, gpt2_dir):
    """Each test that takes this runs once per architecture."""
    return {"llama": llama_dir, "gpt2": gpt2_dir}[request.param]
