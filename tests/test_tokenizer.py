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


def _gguf_tokenizer(tmp_path, pre):
    """A GGUF holding only a byte-level vocabulary (every byte a token, no merges)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    from speckv.models.tokenizer import Tokenizer

    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(sorted(ByteLevel.alphabet()))
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Tokenizer.from_gguf(gguf.GGUFReader(path), path)


@pytest.mark.parametrize("pre, words", [
    ("llama-bpe", ["Hello", " world", " ", "123", "45", "!!\n\n", " ", " ok"]),
    ("qwen2", ["Hello", " world", " ", "1", "2", "3", "4", "5", "!!\n\n", " ", " ok"]),
    ("gpt2", ["Hello", " world", " 12345", "!!", "\n\n ", " ok"]),
])
def test_gguf_pre_tokenizers_split_as_their_models_do(tmp_path, pre, words):
    tok = _gguf_tokenizer(tmp_path, pre)
    text = "Hello world 12345!!\n\n  ok"
    splits = tok.backend.pre_tokenizer.pre_tokenize_str(text)  # byte-level: " " is "Ġ"
    assert [w for w, _ in splits] == [w.replace(" ", "Ġ").replace("\n", "Ċ") for w in words]
    assert tok.decode(tok.encode(text)) == text


def test_an_unknown_gguf_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"GGUF pre-tokenizer 'deepseek-llm' is not supported "
                                         r"\(supported: default, gpt2, smollm, llama-bpe, qwen2\)"):
        _gguf_tokenizer(tmp_path, "deepseek-llm")
