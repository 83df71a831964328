"""Code written for vLLM's offline API runs on speckv where the names mean the same (F11)."""

from __future__ import annotations

import pytest

from speckv import SamplingParams


def test_a_vllm_style_script_runs_unchanged(llm):
    prompts = ["The capital of France is", "Water boils at"]
    sampling_params = SamplingParams(max_tokens=6, temperature=0)
    outputs = llm.generate(prompts, sampling_params=sampling_params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert output.prompt == prompt
        assert output.prompt_token_ids == llm.tokenizer.encode(prompt)
        assert completion.index == 0 and completion.text == output.text
        assert completion.token_ids == output.token_ids and len(completion.token_ids) <= 6
        assert completion.finish_reason in ("stop", "length")
        assert completion.cumulative_logprob is None and completion.logprobs is None


def test_the_old_params_keyword_still_works_with_a_warning(llm):
    params = SamplingParams(max_tokens=3, temperature=0)
    expected = llm.generate("Hello", sampling_params=params, use_tqdm=False)[0].token_ids
    with pytest.warns(DeprecationWarning, match="use sampling_params="):
        assert llm.generate("Hello", params=params, use_tqdm=False)[0].token_ids == expected
    with pytest.raises(TypeError, match="not both"):
        llm.generate("Hello", params, params=params)


def test_sampling_params_defaults_are_vllms():
    """vLLM's SamplingParams defaults, field by field (vLLM 0.10's values)."""
    vllm_defaults = dict(n=1, best_of=None, presence_penalty=0.0, frequency_penalty=0.0,
                         repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                         min_p=0.0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False,
                         max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None)
    params = SamplingParams()
    assert {name: getattr(params, name) for name in vllm_defaults} == vllm_defaults
    assert not params.greedy


def test_the_command_line_keeps_greedy_64_token_defaults():
    from speckv.cli import _cli_defaults

    assert _cli_defaults(SamplingParams) == {"max_tokens": 64, "temperature": 0.0}
    assert SamplingParams(**_cli_defaults(SamplingParams)).greedy


def test_vllm_engine_keywords_are_aliases_or_refused_with_what_to_use():
    from speckv.config import EngineConfig

    config = EngineConfig.from_kwargs(block_size=32, seed=7)
    assert config.cache.page_size == 32 and config.sampler.engine_seed == 7
    with pytest.raises(ValueError, match="not both"):
        EngineConfig.from_kwargs(block_size=32, page_size=16)
    with pytest.raises(ValueError, match="'gpu_memory_utilization' is vLLM's option; .*"
                                         "device_kv_bytes="):
        EngineConfig.from_kwargs(gpu_memory_utilization=0.9)
