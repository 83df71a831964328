"""Structured output: decoding held to a JSON schema (or to any JSON object) or to a
regular expression, with llguidance — the grammar engine behind OpenAI's, vLLM's and
llama.cpp's structured outputs.

A constrained sequence has a `Matcher`. Each step, the tokens its grammar allows next
become a mask on its logits before the pick (greedy or sampled alike), and the picked
token advances the matcher; once the grammar is complete only EOS is allowed, so the
request ends with exactly what the grammar accepts (unless max_tokens ends it first:
finish_reason "length", as OpenAI's). JSON is compact, one space after ',' and ':' and
no other whitespace, so a small model cannot wander off into blank lines. Logprobs stay
the model's own (taken before the mask).
"""

from __future__ import annotations

import json
import threading

import torch

# the JSON the grammar allows: json.dumps's default separators, no other whitespace
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens the grammar allows next."""
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(),
                                              self._words.numel() * self._words.element_size())
        return ((self._words[:, None] >> self._bits) & 1).flatten()[:self._vocab].bool()

    def consume(self, token: int) -> None:
        """Advances past `token` (one the mask allowed); ValueError if the grammar refuses."""
        if not self._matcher.consume_token(token):
            raise ValueError(f"the response format refused token {token}: "
                             f"{self._matcher.get_error()}")


class Grammars:
    """Compiles requests' formats against the model's tokenizer (built once, on first use)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._ll = None
        self._lock = threading.Lock()

    def matcher(self, guided_json: dict | bool | None, guided_regex: str | None) -> Matcher | None:
        """A matcher for a request's format (None: unconstrained).

        Raises:
            ValueError: a schema or regex llguidance cannot use, with its reason.
        """
        if guided_json is None and guided_regex is None:
            return None
        import llguidance

        if guided_regex is not None:
            name, grammar = "guided_regex", llguidance.LLMatcher.grammar_from_regex(guided_regex)
        else:
            schema = {"type": "object"} if guided_json is True else guided_json
            name = "guided_json"
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides=_JSON_STYLE)
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{name} cannot be used: {matcher.get_error()}")
        return Matcher(matcher, self._vocab)

    def _ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(self._tokenizer.backend.to_str(),
                                                  n_vocab=self._vocab, eos_token=self._stop_ids)
            return self._ll
