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
