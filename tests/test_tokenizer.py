"""The GGUF tokenizer against HF's tokenizer for the same file, and incremental decoding."""

from __future__ import annotations

import pytest

from speckv.models.loader import bundled_model_path
from speckv.models.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = bundled_model_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("text", [
    "Hello world! How are you today?",
    "def f(x):\n    return x  # comment\n\n\tTabs and    spaces",
    "Ünïcödé, emoji 🙂 and 中文.",
    "<|im_start|>user\nhi<|im_end|>",
])
def test_matches_hf_without_digits(llm, hf_tokenizer, text):
    assert llm.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids


def test_digits_are_split_one_by_one(llm):
    """SmolLM's pre-tokenizer (GGUF `tokenizer.ggml.pre = smollm`) splits every digit."""
    ids = llm.tokenizer.encode("year 2024")
    pieces = [llm.tokenizer.decode([i]) for i in ids]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_round_trip(llm):
    text = "Round trip: ünïcödé 🙂, numbers 12345 and code {x: [1, 2]}."
    assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == text


def test_incremental_detokenizer_never_splits_a_character(llm):
    text = "Emoji 🙂🚀 and 中文字符 mixed with text."
    detok = IncrementalDetokenizer(llm.tokenizer)
    deltas = [detok.add(t) for t in llm.tokenizer.encode(text)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == detok.text
