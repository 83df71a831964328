"""A model ready to serve: weights on the device, tokenizer, context window.

Engines can share one `LoadedModel` (tests and benchmarks that sweep cache budgets
build many engines on the same weights without loading them again).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from speckv.config import ModelConfig
from speckv.models.args import ModelArgs
from speckv.models.llama import LlamaModel
from speckv.models.loader import load_checkpoint
from speckv.models.quant import check_weight_quant
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

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def serves(self, config: ModelConfig) -> bool:
        """Whether an engine configured with `config` can run on these weights."""
        return (config.model, config.device, config.dtype, config.weight_quant) == (
            self.config.model, self.config.device, self.config.dtype, self.config.weight_quant)

    def fingerprint(self) -> str:
        """A hash of the weights' files that tells checkpoints apart without reading them
        whole: each file's name, size and its first, middle and last MiB (a tensor changed
        elsewhere with the size kept is not seen), with the options they were loaded
        with. Part of the prefix cache's namespace."""
        h = hashlib.blake2b(digest_size=16)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        for file in files:
            size = file.stat().st_size
            h.update(f"{file.name}:{size}".encode())
            with file.open("rb") as f:
                for at in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
                    f.seek(at)
                    h.update(f.read(1 << 20))
        h.update(f"{self.config.dtype}:{self.config.weight_quant}".encode())
        return h.hexdigest()

    def context_window(self, config: ModelConfig) -> int:
        """The engine's context window: `max_model_len`, at most what the model supports
        (a sliding-window model's is its position limit: attention past the window reads
        the window's pages only)."""
        limit = self.args.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context window "
                f"of {limit} tokens")
        return config.max_model_len or limit


def load_model(config: ModelConfig) -> LoadedModel:
    """Loads and converts the weights named by `config.model` onto its device and dtype."""
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    keep = check_weight_quant(config.weight_quant, device, dtype)
    checkpoint = load_checkpoint(config.model, keep_quantized=keep)
    model = LlamaModel(checkpoint.args, checkpoint.state_dict, device=device, dtype=dtype,
                       max_len=checkpoint.args.max_position_embeddings,
                       weight_quant=config.weight_quant)
    return LoadedModel(config, model, checkpoint.tokenizer, checkpoint.path)
