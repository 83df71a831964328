"""Loading an HF safetensors checkpoint: the bundled weights saved by transformers
load into speckv and give the same logits as speckv's own GGUF load."""

from __future__ import annotations

import json

import pytest
import torch

from speckv import LLM, SamplingParams


@pytest.mark.slow
def test_safetensors_dir_matches_gguf(llm, hf_model, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from speckv.models.loader import bundled_model_path

    from safetensors.torch import save_file

    # transformers will not save_pretrained() a GGUF-loaded model: write the HF layout
    # (config.json + model.safetensors, tied lm_head left out) from its state dict.
    out = tmp_path_factory.mktemp("hf-smollm2")
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"))
    path = bundled_model_path()
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)

    from_dir = LLM(model=str(out), device="cpu", device_kv_bytes="32MiB")
    assert from_dir.engine.args.num_layers == 30 and from_dir.engine.args.tie_word_embeddings
    text = "Photosynthesis turns sunlight into"
    ids = llm.tokenizer.encode(text)
    assert from_dir.tokenizer.encode(text) == ids
    diff = (from_dir.engine.score(ids) - llm.engine.score(ids)).abs().max().item()
    assert diff < 1e-4
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert from_dir.generate(ids, params)[0].token_ids == llm.generate(ids, params)[0].token_ids
