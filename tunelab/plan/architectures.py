"""Model shapes for ``tunelab plan``: a built-in table of common architectures and a config.json reader.

The plan needs shapes, never weights, so it answers offline: a local model folder (or a
``builtin:`` tiny model, built locally) gives its ``config.json``; a hub id is looked up in
``KNOWN`` by its name without the organisation and without an ``-Instruct``/``-Chat`` suffix.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import expand_path

# Projections of one decoder block as (module path in the block, group); the group names the
# shared input: "attn_in" (q/k/v read the normed hidden states), "attn_out", "mlp_in", "mlp_out".
BLOCK_LINEARS = (
    ("self_attn.q_proj", "attn_in"), ("self_attn.k_proj", "attn_in"), ("self_attn.v_proj", "attn_in"),
    ("self_attn.o_proj", "attn_out"), ("mlp.gate_proj", "mlp_in"), ("mlp.up_proj", "mlp_in"), ("mlp.down_proj", "mlp_out"),
)


@dataclass(frozen=True)
class Linear:
    name: str       # full module name as PEFT sees it, e.g. "model.layers.3.self_attn.q_proj"
    group: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder (Llama, Mistral, Qwen2/3): SwiGLU MLP, RMSNorm, grouped-query attention."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    head_dim: int = 0           # 0 = hidden_size // num_heads
    qkv_bias: bool = False      # Qwen2 has biases on q, k, v
    mlp_bias: bool = False
    qk_norm: bool = False       # Qwen3 normalises q and k per head

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.dim

    def block_linears(self, layer: int) -> list[Linear]:
        h, q, kv, i = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        found = []
        for path, group in BLOCK_LINEARS:
            short = path.rsplit(".", 1)[1]
            bias = (self.qkv_bias and group == "attn_in") or (self.mlp_bias and group.startswith("mlp"))
            found.append(Linear(f"model.layers.{layer}.{path}", group, *shapes[short], bias))
        return found

    def linears(self) -> list[Linear]:
        """Every linear layer of the decoder stack (not the output head), in model order."""
        return [linear for layer in range(self.num_layers) for linear in self.block_linears(layer)]

    def head(self) -> Linear:
        return Linear("lm_head", "head", self.hidden_size, self.vocab_size, False)

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def norm_params(self) -> int:
        per_layer = 2 * self.hidden_size + (2 * self.dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    def linear_params(self) -> int:
        return sum(l.in_features * l.out_features + (l.out_features if l.bias else 0) for l in self.linears())

    def parameters(self) -> int:
        return self.embedding_params() + self.norm_params() + self.linear_params()


def _arch(name, model_type, h, layers, heads, kv, inter, vocab, tied, **extra) -> Architecture:
    return Architecture(name, model_type, h, layers, heads, kv, inter, vocab, tied, **extra)


# Shapes copied from each model's config.json on the Hugging Face hub (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings, head_dim).
# tests/test_plan.py checks that they add up to the parameter counts the model cards publish.
KNOWN = {a.name.lower(): a for a in (
    _arch("Llama-2-7b", "llama", 4096, 32, 32, 32, 11008, 32000, False),
    _arch("Llama-2-13b", "llama", 5120, 40, 40, 40, 13824, 32000, False),
    _arch("Llama-2-70b", "llama", 8192, 80, 64, 8, 28672, 32000, False),
    _arch("Meta-Llama-3-8B", "llama", 4096, 32, 32, 8, 14336, 128256, False),
    _arch("Meta-Llama-3-70B", "llama", 8192, 80, 64, 8, 28672, 128256, False),
    _arch("Llama-3.1-8B", "llama", 4096, 32, 32, 8, 14336, 128256, False),
    _arch("Llama-3.1-70B", "llama", 8192, 80, 64, 8, 28672, 128256, False),
    _arch("Llama-3.1-405B", "llama", 16384, 126, 128, 8, 53248, 128256, False),
    _arch("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 8192, 128256, True, head_dim=64),
    _arch("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 8192, 128256, True, head_dim=128),
    _arch("Llama-3.3-70B", "llama", 8192, 80, 64, 8, 28672, 128256, False),
    _arch("Mistral-7B-v0.1", "mistral", 4096, 32, 32, 8, 14336, 32000, False),
    _arch("Mistral-7B-v0.3", "mistral", 4096, 32, 32, 8, 14336, 32768, False),
    _arch("Mistral-Nemo-Base-2407", "mistral", 5120, 40, 32, 8, 14336, 131072, False, head_dim=128),
    _arch("Qwen2.5-0.5B", "qwen2", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-1.5B", "qwen2", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-3B", "qwen2", 2048, 36, 16, 2, 11008, 151936, True, qkv_bias=True),
    _arch("Qwen2.5-7B", "qwen2", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-14B", "qwen2", 5120, 48, 40, 8, 13824, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-32B", "qwen2", 5120, 64, 40, 8, 27648, 152064, False, qkv_bias=True),
    _arch("Qwen2.5-72B", "qwen2", 8192, 80, 64, 8, 29568, 152064, False, qkv_bias=True),
    _arch("Qwen3-8B", "qwen3", 4096, 36, 32, 8, 12288, 151936, False, head_dim=128, qk_norm=True),
)}
# Names users write for the same weights (hub ids without the organisation, lower case).
ALIASES = {"llama-3-8b": "meta-llama-3-8b", "llama-3-70b": "meta-llama-3-70b", "mistral-7b": "mistral-7b-v0.1",
           "llama-2-7b-hf": "llama-2-7b", "llama-2-13b-hf": "llama-2-13b", "llama-2-70b-hf": "llama-2-70b",
           "mistral-nemo-instruct-2407": "mistral-nemo-base-2407", "meta-llama-3.1-8b": "llama-3.1-8b",
           "meta-llama-3.1-70b": "llama-3.1-70b", "meta-llama-3.1-405b": "llama-3.1-405b"}
SUFFIXES = re.compile(r"(-instruct|-chat|-it|-hf|-base)+$")
DECODERS = {"llama", "mistral", "qwen2", "qwen3"}


def from_config_json(config: dict, name: str) -> Architecture:
    """An ``Architecture`` from a Hugging Face ``config.json`` of a Llama-family decoder."""
    model_type = config.get("model_type", "?")
    if model_type not in DECODERS:
        raise UserError(f'{name} is a "{model_type}" model; tunelab plan knows Llama-family decoders '
                        f"({', '.join(sorted(DECODERS))}); set model.name_or_path to one of those.")
    try:
        return Architecture(
            name=name, model_type=model_type, hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            intermediate_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias")),
            mlp_bias=bool(config.get("mlp_bias")), qk_norm=model_type == "qwen3",
        )
    except KeyError as missing:
        raise UserError(f"{name}/config.json has no {missing} entry; point model.name_or_path at a complete "
                        "Hugging Face model folder.") from None


def lookup(name_or_path: str) -> Architecture:
    """The architecture of ``model.name_or_path``: a local folder's config.json, a built-in, or the table."""
    from tunelab.models.load import BUILTIN_PREFIX, resolve_model_path

    folder = expand_path(name_or_path)
    if name_or_path.startswith(BUILTIN_PREFIX) or (folder / "config.json").is_file():
        folder = Path(resolve_model_path(name_or_path))  # builds a built-in tiny model locally on first use
        return from_config_json(json.loads((folder / "config.json").read_text()), name_or_path)
    key = SUFFIXES.sub("", name_or_path.rsplit("/", 1)[-1].lower())
    key = ALIASES.get(key, key)
    if key in KNOWN:
        return KNOWN[key]
    raise UserError(
        f'tunelab plan does not know the shapes of "{name_or_path}"; set model.name_or_path to a local folder '
        f"with config.json or one of: {', '.join(a.name for a in KNOWN.values())}."
    )
