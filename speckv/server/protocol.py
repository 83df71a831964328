"""Request bodies of the OpenAI API (the part speckv serves) and the response shapes.

Every field is honoured or refused: a field this server does not implement (OpenAI's
`suffix`, `tools`, `audio`, `store`, ... or a misspelt one) is a 400 naming it, never
silently ignored. Beside the OpenAI fields (n, best_of, logprobs and top_logprobs, echo,
penalties and logit_bias among them), requests take vLLM's extras
`repetition_penalty`, `min_p`, `stop_token_ids`, `min_tokens`, llama.cpp's `cache_prompt`
(false: this request neither reuses nor leaves cached pages), and speckv's per-request
options: `top_k`, `ignore_eos`, `selector`, `token_budget`. Usage reports
`prompt_tokens_details.cached_tokens`, as OpenAI's does.

Types are strict (`max_tokens: true`, `"10"` or `2.0` are errors, not 1, 10 and 2;
a number field takes an int or a float), and text must be valid Unicode (a lone
surrogate such as "\ud800" is an error naming the field).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from speckv.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs, most_likely
from speckv.engine.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from speckv.models.tokenizer import Tokenizer


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(f"contains a lone surrogate (U+{ord(bad):04X} at character "
                         f"{exc.start}), which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _STRICT

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> [-100, 100]
    # vLLM's extras
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(default=0, ge=0)
    # llama.cpp's: false = neither reuse cached pages nor cache this request's
    cache_prompt: bool = True
    # vLLM's structured-output extras (chat also takes OpenAI's response_format)
    guided_json: dict | None = None
    guided_regex: Text | None = None
    # speckv's own
    top_k: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    selector: Text | None = None
    token_budget: int | float | Text | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        # the keys arrive as strings; their values are SamplingParams' to check
        for token in bias or {}:
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
        return bias

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises ValueError (from SamplingParams) for a bad selector budget."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              n=self.n, best_of=self.choices_best_of(),
                              logprobs=self.token_logprobs(),
                              prompt_logprobs=self.prompt_logprobs(),
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=stop,
                              ignore_eos=self.ignore_eos, selector=self.selector,
                              token_budget=self.token_budget,
                              presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=bias,
                              repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                              stop_token_ids=tuple(self.stop_token_ids or ()),
                              min_tokens=self.min_tokens, cache_prompt=self.cache_prompt,
                              guided_json=self.guided(), guided_regex=self.guided_regex)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def choices_best_of(self) -> int | None:
        return None

    def guided(self) -> dict | bool | None:
        """The JSON the output is held to: a schema, True for any object, None."""
        return self.guided_json

    def token_logprobs(self) -> int | None:
        """How many alternatives per generated token the response lists (None: no logprobs)."""
        return None

    def prompt_logprobs(self) -> int | None:
        return None


class CompletionRequest(_Sampling):
    prompt: Text | list[int] | list[Text]
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens') before the answer
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of: int | None, info) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of < n:
            raise ValueError(f"must be at least n ({n})")
        if best_of is not None and best_of > n and info.data.get("stream"):
            raise ValueError("best_of > n cannot be streamed (the best are known at the end)")
        return best_of

    def choices_best_of(self) -> int | None:
        return self.best_of

    def token_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new system
    content: Text | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """The message as the chat template takes it."""
        return {"role": "system" if self.role == "developer" else self.role,
                "content": self.text()}

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TokenizeRequest(BaseModel):
    """`/v1/tokenize` (vLLM's shape): a prompt, or chat messages rendered with the
    model's template; exactly one of the two."""

    model_config = _STRICT

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               validate_default=True)
    add_generation_prompt: bool = True

    @field_validator("messages")
    @classmethod
    def _one_input(cls, messages: list[ChatMessage] | None, info) -> list[ChatMessage] | None:
        if (info.data.get("prompt") is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return messages


class DetokenizeRequest(BaseModel):
    """`/v1/detokenize` (vLLM's shape): token ids back to text."""

    model_config = _STRICT

    model: Text | None = None
    tokens: list[int]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict | None = None  # text, json_object or json_schema (llguidance)
    # not built yet: rejected by name rather than ignored
    tools: list | None = None
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        if value and value != "none":
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, top: int | None, info) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("response_format")
    @classmethod
    def _format(cls, value: dict | None, info) -> dict | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r} is not supported (text, json_object, json_schema)")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("json_schema must be an object with a 'schema' object")
        if kind != "text" and (info.data.get("guided_json") is not None
                               or info.data.get("guided_regex") is not None):
            raise ValueError("give response_format or guided_json/guided_regex, not both")
        return value

    def guided(self) -> dict | bool | None:
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return True
        if fmt.get("type") == "json_schema":
            return fmt["json_schema"].get("schema") or True
        return self.guided_json

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.num_prompt_tokens,
            "completion_tokens": out.num_generated_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_generated_tokens,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


class ResponseShape:
    """Builds the response objects of one request (completion or chat): a choice per
    `CompletionOutput`, its logprobs in OpenAI's shape for the endpoint."""

    def __init__(self, chat: bool, model: str, tokenizer: Tokenizer,
                 body: "_Sampling | None" = None) -> None:
        self.chat = chat
        self.model = model
        self.tokenizer = tokenizer
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.echo = isinstance(body, CompletionRequest) and body.echo
        self.top = None if body is None else body.token_logprobs()
        self._sent_logprobs: dict[int, int] = {}  # per choice: tokens whose logprobs went out
        self._text_offset: dict[int, int] = {}  # per choice: completions' text_offset so far

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def full(self, out: RequestOutput) -> dict:
        choices = []
        for c in out.outputs:
            logprobs = self._logprobs(out, c, echo=self.echo)
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": c.finish_reason, "logprobs": logprobs})
            else:
                text = out.prompt + c.text if self.echo else c.text
                choices.append({"index": c.index, "text": text, "finish_reason": c.finish_reason,
                                "logprobs": logprobs})
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(out)
        return body

    def chunk(self, out: RequestOutput, c: CompletionOutput, reason: str | None,
              first: bool = False) -> dict:
        """A streamed chunk of choice `c`: its new text and its new tokens' logprobs."""
        text = c.delta
        if self.echo and first:
            text = out.prompt + text
        logprobs = self._logprobs(out, c, echo=self.echo and first)
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if first else {"content": text}
            if reason is not None and not text:
                delta = {}
            choice = {"index": c.index, "delta": delta, "finish_reason": reason,
                      "logprobs": logprobs}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": c.index, "text": text, "finish_reason": reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, out: RequestOutput) -> dict:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(out)
        return body

    # ------------------------------------------------------------ logprobs

    def _logprobs(self, out: RequestOutput, c: CompletionOutput, echo: bool) -> dict | None:
        """The logprobs of `c`'s tokens not given out yet (and, with `echo`, the prompt's
        before them), as the endpoint shapes them; None without logprobs."""
        if self.top is None or c.logprobs is None:
            return None
        start = self._sent_logprobs.get(c.index, 0)
        ids, entries = c.token_ids[start:len(c.logprobs)], c.logprobs[start:]
        self._sent_logprobs[c.index] = len(c.logprobs)
        if self.chat:
            return {"content": [self._chat_entry(t, e) for t, e in zip(ids, entries)]}
        if echo:
            ids = out.prompt_token_ids + ids
            entries = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
        tokens = [self.tokenizer.token_text(t) for t in ids]
        offsets = []
        offset = self._text_offset.get(c.index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._text_offset[c.index] = offset
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e[t].logprob for t, e in zip(ids, entries)],
                "top_logprobs": [None if e is None else self._top(t, e) for t, e in zip(ids, entries)],
                "text_offset": offsets}

    def _top(self, token: int, entry: TokenLogprobs) -> dict[str, float]:
        """Completions' top_logprobs: the `logprobs` most likely tokens' text -> logprob,
        and the chosen token's (vLLM's)."""
        best = dict(most_likely(entry, self.top))
        best.setdefault(token, entry[token])  # ranked below them, so last
        return {lp.decoded_token: lp.logprob for lp in best.values()}

    def _chat_entry(self, token: int, entry: TokenLogprobs) -> dict:
        def item(t: int, logprob: float) -> dict:
            return {"token": self.tokenizer.token_text(t), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(t))}

        return {**item(token, entry[token].logprob),
                "top_logprobs": [item(t, lp.logprob) for t, lp in most_likely(entry, self.top)]}
