"""Load base models and tokenizers: hub ids, local folders, and tunelab's built-in tiny models.

Hub ids and local folders go through the ordinary ``from_pretrained`` path.
``builtin:<name>`` models are built by tunelab itself (no download) and cached
under ``$TUNELAB_CACHE`` (default ``~/.cache/tunelab``), so configs and tests run
on a machine that cannot reach a hub.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError, did_you_mean, first_line
from tunelab.io import cache_dir, expand_path, looks_like_local_path
from tunelab.models import tiny

BUILTIN_PREFIX = "builtin:"
# name -> (cache folder, builder). The folder name carries a version: bump it when the
# builder's output changes so stale caches are never reused.
BUILTIN_MODELS = {"tiny-llama": ("tiny-llama-v1", tiny.build_tiny_model)}


def check_model_reference(name_or_path: str) -> None:
    """Fail early for a reference that cannot load: unknown built-in or missing local folder."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_MODELS:
            raise UserError(
                f'model.name_or_path "{name_or_path}" is not a built-in model'
                f"{did_you_mean(name, BUILTIN_MODELS)}; built-ins are: "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS) + "."
            )
        return
    path = expand_path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f'model.name_or_path "{name_or_path}" is a local path without a config.json; '
                "point it at a Hugging Face model folder."
            )
    elif looks_like_local_path(name_or_path):
        raise UserError(
            f'model.name_or_path "{name_or_path}" does not exist; check the path '
            "(or run the step that creates it first)."
        )


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub id ``from_pretrained`` understands, building built-ins on first use."""
    check_model_reference(name_or_path)
    if not name_or_path.startswith(BUILTIN_PREFIX):
        local = expand_path(name_or_path)
        return str(local) if local.exists() else name_or_path
    folder, builder = BUILTIN_MODELS[name_or_path.removeprefix(BUILTIN_PREFIX)]
    target = cache_dir() / "models" / folder
    if not (target / "config.json").is_file():
        builder(target)
    return str(target)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it, else fp32.

    On a CPU ``auto`` stays fp32 even where the CPU has bf16 matrix instructions: the same
    config then gives the same numbers on every CPU (tests and CI pin losses). ``dtype_hint``
    tells users of such CPUs that ``bfloat16`` is faster there.
    """
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX).

    Without them oneDNN emulates bf16 and a bf16 linear layer runs several times slower than
    fp32; with them it runs faster than fp32 (bench/RESULTS.md has both measurements).
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def dtype_hint(model_config: ModelConfig) -> str | None:
    """A one-line tip when ``auto`` chose fp32 on a CPU where bf16 would be faster."""
    if model_config.dtype != "auto" or torch.cuda.is_available() or not cpu_has_bf16_matmul():
        return None
    return ("tunelab: this CPU has bf16 matrix instructions; model.dtype: bfloat16 trains faster here than "
            "the fp32 that auto picks on CPUs (see bench/RESULTS.md)")


def load_tokenizer(model_config: ModelConfig) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model_config.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model_config.revision, trust_remote_code=model_config.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _load_error(model_config, "tokenizer", exc) from exc
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss and attention, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_config: ModelConfig, **recipe_kwargs: Any) -> PreTrainedModel:
    """Load the base model; ``recipe_kwargs`` (e.g. a quantization config) come from the recipe."""
    path = resolve_model_path(model_config.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=resolve_dtype(model_config.dtype),
            revision=model_config.revision,
            trust_remote_code=model_config.trust_remote_code,
            attn_implementation=model_config.attn_implementation,
            **recipe_kwargs,
        )
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        raise UserError(
            f"loading {model_config.name_or_path} needs a package that is not installed ({first_line(exc)}); "
            "install it or change model.attn_implementation."
        ) from exc
    except (OSError, ValueError) as exc:
        raise _load_error(model_config, "model", exc) from exc
    keep_4bit_layout(model)
    return model


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with avx512_bf16, ``bnb.nn.Linear4bit`` rewrites its weight in place into a
    CPU-only layout on its first forward in eval mode without gradients (an evaluation
    pass, a generation, a probe) and from then on computes that layer in bf16 whatever
    the compute dtype. Training afterwards goes through an op without a backward (no
    gradient reaches the layers below) and the fused kernels' dequantize reads the
    wrong layout. Evaluation must see the weights training sees, so the switch is off.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def _load_error(model_config: ModelConfig, what: str, exc: Exception) -> UserError:
    text = str(exc)
    if "trust_remote_code" in text:
        return UserError(
            f'model.name_or_path "{model_config.name_or_path}" needs custom code from its repository; '
            "set model.trust_remote_code: true if you trust it."
        )
    return UserError(
        f'the {what} of model.name_or_path "{model_config.name_or_path}" could not be loaded ({first_line(exc)}); '
        "check the hub id or local path (hub ids need network access or a filled HF cache)."
    )
