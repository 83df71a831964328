"""A model ready to serve: weights on the device, tokenizer, context window.

Engines can share one `LoadedModel` (tests and benchmarks that sweep cache budgets
build many engines on the same weights without loading them again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.config import ModelConfig
from speckv.models.args import ModelArgs
from speckv.models.llama import LlamaModel
from speckv.models.loader import load_checkpoint
from speckv.models.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig  # the options it was loaded with
    model: LlamaModel
    tokenizer: Tokenizer
    path: Path
    max_model_len: int

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def load_model(config: ModelConfig) -> LoadedModel:
    """Loads and converts the weights named by `config.model` onto its device and dtype."""
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(config.model)
    max_len = config.max_model_len or checkpoint.args.max_position_embeddings
    model = LlamaModel(checkpoint.args, checkpoint.state_dict, device=device,
                       dtype=DTYPES[config.dtype], max_len=max_len)
    return LoadedModel(config, model, checkpoint.tokenizer, checkpoint.path, max_len)
