"""Tokenizer and chat template, built from the GGUF metadata or an HF tokenizer.json.

The GGUF stores a byte-level BPE (`tokenizer.ggml.model = gpt2`) as its vocabulary and
merges, and names the pre-tokenizer of the model's own tokenizer.json
(`tokenizer.ggml.pre`); each one read here is that split: GPT-2's byte-level regex
(`default`, `gpt2`), SmolLM's (every digit on its own first), Llama 3's and Qwen2's
regex splits (digits in runs of up to 3, or one by one; Qwen2 NFC-normalizes first).
Any other is refused: the wrong split would tokenize silently differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jinja2
from tokenizers import (AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models,
                        normalizers, pre_tokenizers)

_CONTROL = 3  # llama.cpp token type of special / control tokens

Message = dict[str, str]

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "qwen2")
"""`tokenizer.ggml.pre` values read (a GGUF without one is `default`)."""


def _pre_tokenizer(pre: str | None, path: Path):
    pre = pre or "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                         f"(supported: {', '.join(PRE_TOKENIZERS)})")
    if pre in ("llama-bpe", "qwen2"):
        split = Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT)
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(splits)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


class Tokenizer:
    """Text <-> token ids, with the model's chat template."""

    def __init__(self, backend: HFTokenizer, *, eos_token_id: int | None,
                 bos_token_id: int | None, add_bos: bool, chat_template: str | None) -> None:
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None if chat_template is None else _jinja_env().from_string(chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a
        UTF-8 character); a special token's own text."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        try:
            return bytes(_BYTE_OF[c] for c in piece)
        except KeyError:  # not a byte-level piece (added tokens with other characters)
            return self.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """One token's text, for logprobs (bytes that are not whole UTF-8 characters
        become U+FFFD, as vLLM shows them)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Renders chat messages (`[{"role": ..., "content": ...}]`) to the prompt text."""
        if self._template is None:
            raise ValueError("this model has no chat template: pass a plain prompt instead")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, reader, path: Path) -> "Tokenizer":
        """From an open `gguf.GGUFReader` (parsing the header is the slow part of loading)."""

        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (only gpt2 BPE)")
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges") or []]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        pre = field("tokenizer.ggml.pre")
        backend.pre_tokenizer = _pre_tokenizer(pre, path)
        if pre == "qwen2":
            backend.normalizer = normalizers.NFC()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(tok, special=True, normalized=False)
             for tok, t in zip(tokens, types) if t == _CONTROL])
        return cls(backend,
                   eos_token_id=field("tokenizer.ggml.eos_token_id"),
                   bos_token_id=field("tokenizer.ggml.bos_token_id"),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: Path, eos_token_id: int | None, bos_token_id: int | None) -> "Tokenizer":
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{path} has no tokenizer.json")
        backend = HFTokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(backend, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                   add_bos=bool(config.get("add_bos_token", False)), chat_template=template)


def _jinja_env() -> jinja2.Environment:
    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = raise_exception
    return env


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; such text decodes
    to U+FFFD and is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this have been emitted as text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Appends one token and returns the new text it completes (maybe empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset])
        full = decode(self._ids[self._prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta
