"""Model shapes for projections: a named one, a HF config.json, or the engine's model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies by: the layers' projections and the LM head."""
        h, d = self.hidden, self.head_dim
        per_layer = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h \
            + 3 * h * self.intermediate
        return self.layers * per_layer + self.vocab * h

    def kv_bytes_per_token(self, element_bytes: float) -> float:
        """K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# published architectures (the models' config.json files)
NAMED: dict[str, ModelShape] = {s.name.lower(): s for s in (
    ModelShape("Llama-2-7B", 32, 4096, 32, 32, 128, 11008, 32000),
    ModelShape("Llama-2-13B", 40, 5120, 40, 40, 128, 13824, 32000),
    ModelShape("Llama-2-70B", 80, 8192, 64, 8, 128, 28672, 32000),
    ModelShape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    ModelShape("Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256),
    ModelShape("OPT-30B", 48, 7168, 56, 56, 128, 4 * 7168 * 2 // 3, 50272),
    ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152),
)}


def of_args(args) -> ModelShape:
    """The shape of a loaded model (`speckv.models.args.ModelArgs`)."""
    return ModelShape(args.name, args.num_layers, args.hidden_size, args.num_heads,
                      args.num_kv_heads, args.head_dim, args.intermediate_size, args.vocab_size)


def load(spec: str) -> ModelShape:
    """A named shape (see NAMED) or a HF config.json (a file or the folder holding it)."""
    if spec.lower() in NAMED:
        return NAMED[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"unknown model shape {spec!r}: give a config.json or one of "
                         f"{', '.join(s.name for s in NAMED.values())}")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return ModelShape(c.get("model_type", path.parent.name), int(c["num_hidden_layers"]),
                          hidden, heads, int(c.get("num_key_value_heads", heads)),
                          int(c.get("head_dim") or hidden // heads),
                          int(c["intermediate_size"]), int(c["vocab_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a usable config.json ({type(exc).__name__}: {exc})") from exc
