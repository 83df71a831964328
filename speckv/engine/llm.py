"""The Python API, in the spirit of vLLM's `LLM`.

    llm = LLM()                                   # bundled SmolLM2-135M-Instruct
    outs = llm.generate(["Hello"], sampling_params=SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].outputs[0].finish_reason)
"""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from speckv.config import EngineConfig
from speckv.engine.llm_engine import LLMEngine
from speckv.engine.outputs import RequestOutput
from speckv.engine.sampling_params import SamplingParams
from speckv.models.loaded import LoadedModel
from speckv.models.tokenizer import Message

Prompt = str | list[int]


class LLM:
    """An engine on one model. Keywords are the engine options (see `speckv generate --help`)."""

    def __init__(self, model: str | None = None, *, loaded: LoadedModel | None = None,
                 **options) -> None:
        """`loaded` shares weights already loaded (`speckv.models.loaded.load_model`)."""
        self.config = EngineConfig.from_kwargs(model=model, **options)
        self.engine = LLMEngine(self.config, loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, params=None) -> list[RequestOutput]:
        """Generates for every prompt (text or token ids), batched continuously: vLLM's
        signature (`params=` is the old name of `sampling_params`, deprecated).

        Raises:
            ValueError: an empty prompt list, a bad prompt (see `LLMEngine.add_request`),
                or a params list whose length differs from the prompts'. Nothing is
                left queued after an error.
        """
        sampling_params = _renamed(params, sampling_params)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        params = self._params_list(sampling_params, len(prompts))
        with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate", unit="req") as bar:
            return self.engine.generate_all(prompts, params, progress=bar)

    def chat(self, conversations: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, params=None) -> list[RequestOutput]:
        """Like `generate`, for chat messages rendered with the model's chat template."""
        sampling_params = _renamed(params, sampling_params)
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations],
                             sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields outputs of one request as its tokens are produced (`.delta` is the new text).

        Other queued requests keep running. Closing the iterator early aborts the request.
        """
        rid = self.engine.add_request(prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    def stats(self) -> dict[str, int | float | str]:
        """Engine counters: requests, pages and bytes per tier, fetches, stall seconds."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """Drops the cached pages no request reads (vLLM's `LLM.reset_prefix_cache`)."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Aborts what is queued and releases the pool (stops a spawned memory node)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _params_list(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params


def _renamed(old, new):
    """`params=`, the name before vLLM's `sampling_params=`: still taken, with a warning."""
    if old is None:
        return new
    if new is not None:
        raise TypeError("give sampling_params or params (its old name), not both")
    warnings.warn("params= is deprecated: use sampling_params= (vLLM's name)",
                  DeprecationWarning, stacklevel=3)
    return old
