"""The shape of a Llama-family model, read from a GGUF header or an HF config.json.

The families differ from Llama in a few switches, each read from the checkpoint:
Qwen2/2.5 add biases to q, k and v (`qkv_bias`), Qwen3 normalizes each head's q and k
(`qk_norm`), Llama 3.1/3.2 scale RoPE's frequencies (`rope_scaling`), Llama 3 lists
several EOS tokens (`eos_token_ids`), Mistral v0.1 attends a sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelArgs:
    """Hyper-parameters of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    name: str = "llama"
    family: str = "llama"  # the HF model_type / GGUF architecture it was read as
    qkv_bias: bool = False  # q, k, v projections have biases (Qwen2, attention_bias)
    o_bias: bool = False  # the output projection too (Llama's attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    rope_scaling: dict | None = field(default=None, hash=False)  # HF's rope_scaling
    sliding_window: int | None = None  # attend only the last this many tokens (Mistral)
    eos_token_ids: tuple[int, ...] = ()  # every token that ends a sequence

    @property
    def stop_ids(self) -> frozenset[int]:
        """The EOS tokens generation stops at (eos_token_id and eos_token_ids)."""
        ids = set(self.eos_token_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})")

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V that one token takes over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        qkv = (h + self.qkv_bias) * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_layer = qkv + self.num_heads * self.head_dim * h + 3 * h * i + 2 * h
        per_layer += h * self.o_bias + 2 * self.head_dim * self.qk_norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h
