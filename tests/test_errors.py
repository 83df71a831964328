"""Every bad input gets a clear error naming the problem; the engine stays usable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speckv import LLM, SamplingParams
from speckv.config import CacheConfig, EngineConfig, parse_size
from tests.conftest import assert_no_leak


def _still_usable(llm):
    assert_no_leak(llm.engine)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert out.num_generated_tokens == 3


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="model path does not exist"):
        LLM(model=str(tmp_path / "nope.gguf"))


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither a .gguf file nor a directory"):
        LLM(model=str(bad))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        LLM(model=str(fake))


def test_hf_dir_not_llama_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not Llama-family"):
        LLM(model=str(tmp_path))


def test_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        LLM(model=str(tmp_path))


def test_gguf_not_llama_family(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not Llama-family"):
        LLM(model=str(path))


def test_prompt_longer_than_context(make_llm):
    small = make_llm(max_model_len=16, device_kv_bytes="8MiB")
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens; the context window is 16"):
        small.generate("word " * 40, SamplingParams(temperature=0, max_tokens=1))
    _still_usable(small)


def test_max_model_len_beyond_model(make_llm):
    with pytest.raises(ValueError, match="exceeds the model's context window of 8192"):
        make_llm(max_model_len=10_000)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"stop": [""]}, "stop strings must be non-empty"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_empty_prompt_list_and_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([])
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""])
    _still_usable(llm)  # the valid prompt queued before the bad one was withdrawn


def test_params_count_mismatch(llm):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])
    _still_usable(llm)


def test_bad_engine_options(make_llm):
    with pytest.raises(ValueError, match="unknown engine option 'page_sise'; known options: .*page_size"):
        make_llm(page_sise=8)
    with pytest.raises(ValueError, match="not a byte size"):
        CacheConfig(device_kv_bytes="lots")
    with pytest.raises(ValueError, match="dtype='float16' is not one of float32, bfloat16"):
        EngineConfig.from_kwargs(dtype="float16")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.from_kwargs(max_num_seqs=64, max_num_batched_tokens=32)
    assert parse_size("1.5GiB") == 1536 * 1024**2 and parse_size("256MB") == 256_000_000


def test_bad_token_ids(llm):
    with pytest.raises(ValueError, match=r"prompt\[2\] = 999999: prompt token ids must be "
                                         r"integers in \[0, 49152\)"):
        llm.generate([[1, 2, 999_999]])
    _still_usable(llm)


@pytest.mark.parametrize("bad", [[-1], [2**40], [2**70], [True], [1.0], ["7"]])
def test_token_ids_are_checked_before_anything_reads_them(llm, bad):
    with pytest.raises(ValueError, match=r"prompt\[0\] = .*: prompt token ids must be integers"):
        llm.generate([bad])
    _still_usable(llm)


def test_a_request_that_cannot_be_sampled_fails_alone(llm, monkeypatch):
    from speckv.engine.sampler import SampleError, Sampler
    from tests.conftest import run_to_completion

    real = Sampler._draw

    def draw(probs, generator):  # this request's sampling breaks, as NaN logits would
        return SampleError("sampling failed: injected") if generator.initial_seed() == 666 \
            else real(probs, generator)

    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    solo = llm.generate("The sea was calm", greedy)[0].token_ids
    monkeypatch.setattr(Sampler, "_draw", staticmethod(draw))
    engine = llm.engine
    good = [engine.add_request("The sea was calm", greedy) for _ in range(2)]
    bad = engine.add_request("The sea was calm", SamplingParams(max_tokens=12, temperature=0.8,
                                                                seed=666))
    finals = run_to_completion(engine)
    assert finals[bad].finish_reason == "error" and "injected" in finals[bad].error
    assert [finals[g].token_ids for g in good] == [solo, solo]
    assert all(finals[g].finish_reason == "length" and finals[g].error is None for g in good)
    assert_no_leak(engine)
