"""Distributed strategies (``distributed.strategy``): DDP, FSDP2 and DeepSpeed ZeRO-2/3.

The strategy is turned into the HF ``TrainingArguments`` fields a user of the Trainer would
set (``fsdp`` / ``fsdp_config``, ``deepspeed``), so the sharding, the sharded checkpoints and
the gathering of a full state dict are accelerate's and DeepSpeed's own code, the same on
GPUs as in our CPU tests. Two things accelerate does not do on a CPU process group (gloo),
and which tunelab therefore does itself:

- DeepSpeed is only chosen by accelerate when it is not told to use the CPU, so a DeepSpeed
  run asks for no CPU mode and names the gloo backend itself when there is no GPU;
- FSDP is only switched on for accelerator devices; on gloo accelerate would silently train
  DDP instead. ``RecipeTrainer`` switches the same FSDP2 plugin on for CPU process groups.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.config.schema import Config, DistributedConfig


def check_strategy(config: Config, world_size: int | None = None) -> None:
    """Refuse strategy settings that cannot work, before any model loads (also run by ``validate``).

    ``world_size`` is given once the processes run (None in ``validate``).
    """
    dist = config.distributed
    if dist.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise UserError('distributed.strategy is "deepspeed" but DeepSpeed is not installed; '
                        'pip install "tunelab[deepspeed]" or choose strategy ddp or fsdp.')
    if dist.strategy == "deepspeed" and world_size is not None and "LOCAL_RANK" not in os.environ:
        raise UserError('distributed.strategy "deepspeed" needs a launcher, even for one process; run '
                        "tunelab train CONFIG [--nproc N] (it starts torchrun), torchrun or accelerate launch.")
    if dist.strategy == "fsdp" and world_size == 1:
        raise UserError('distributed.strategy "fsdp" shards the model across processes but this run has one; '
                        "start it with --nproc N (or torchrun / accelerate launch), or use strategy ddp.")
    if dist.strategy == "fsdp" and config.recipe.name in ("prefix", "ptuning"):
        # Measured: the virtual-token embedding stays a plain tensor and meets sharded (DTensor)
        # weights in the first layer, which FSDP2 refuses mid-step.
        raise UserError(f'recipe "{config.recipe.name}" does not train under distributed.strategy "fsdp" (its '
                        "virtual tokens live outside the sharded layers); use strategy deepspeed or ddp.")
    if dist.strategy == "deepspeed" and config.training.optimizer.startswith("paged_"):
        raise UserError(f"training.optimizer {config.training.optimizer} cannot be combined with DeepSpeed, which "
                        "manages optimizer memory itself; use adamw_torch (and distributed.deepspeed.offload_optimizer).")


def prepare_environment(dist: DistributedConfig) -> None:
    """Set what must be in the environment before the process group is formed."""
    if dist.strategy == "deepspeed":  # (DeepSpeed finds its CPU accelerator by itself when there is no GPU)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"


def uses_cpu_mode(dist: DistributedConfig) -> bool:
    """Whether accelerate is told to run on the CPU (DeepSpeed finds its CPU accelerator itself)."""
    return not torch.cuda.is_available() and dist.strategy != "deepspeed"


def process_group_backend(dist: DistributedConfig) -> str | None:
    """The backend to name when the process group is formed (``None``: accelerate's choice).

    Without a GPU, accelerate outside its CPU mode finds no backend and would count every
    DeepSpeed process as a lone main process; naming gloo gives it the real ranks.
    """
    return "gloo" if dist.strategy == "deepspeed" and not torch.cuda.is_available() else None


def training_arguments(config: Config, model: torch.nn.Module) -> dict[str, Any]:
    """The ``TrainingArguments`` fields that select and configure the strategy."""
    dist, checkpointing = config.distributed, config.training.gradient_checkpointing
    if dist.strategy == "fsdp":
        fsdp = dist.fsdp
        return {
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                "cpu_offload": fsdp.cpu_offload,
                "transformer_layer_cls_to_wrap": fsdp.wrap_classes or _layer_classes(model),
                "reshard_after_forward": fsdp.reshard_after_forward,
                # Checkpoints hold each process's shard (no gathering at every save); the final
                # artifact is gathered into a full state dict separately.
                "state_dict_type": "SHARDED_STATE_DICT",
                # FSDP's own activation checkpointing replaces the Trainer's under FSDP.
                "activation_checkpointing": checkpointing,
            },
            "gradient_checkpointing": False,
        }
    if dist.strategy == "deepspeed":
        ds = dist.deepspeed
        zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": torch.cuda.is_available()}
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.zero_stage == 3:
            # Lets the final save gather the partitioned weights into one state dict.
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        # "auto" values are filled in by the Trainer from the training section, so the two never disagree.
        return {
            "deepspeed": {
                "zero_optimization": zero,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                # A bf16/fp16 model trains in DeepSpeed's mixed precision: 16-bit weights for the
                # passes, fp32 master weights in the (sharded) optimizer. Set by the two flags below.
                "bf16": {"enabled": "auto"},
                "fp16": {"enabled": "auto"},
            },
            # (On a CPU the Trainer refuses these flags; a 16-bit model then trains without master weights.)
            "bf16": config.model.dtype == "bfloat16" and torch.cuda.is_available(),
            "fp16": config.model.dtype == "float16" and torch.cuda.is_available(),
            # The Trainer would form the process state again (and, without a GPU, lose the ranks
            # that process_group_backend gave it); the one tunelab formed is kept instead.
            "accelerator_config": {"use_configured_state": True},
        }
    return {}


def describe_strategy(dist: DistributedConfig) -> str:
    """One line for the start-up log: how the processes share the model."""
    if dist.strategy == "fsdp":
        return "FSDP2, parameters, gradients and optimizer state sharded" + (", offloaded to CPU" if dist.fsdp.cpu_offload else "")
    if dist.strategy == "deepspeed":
        ds = dist.deepspeed
        sharded = "gradients and optimizer state" if ds.zero_stage == 2 else "parameters, gradients and optimizer state"
        offloaded = [name for name, on in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_params)) if on]
        return f"DeepSpeed ZeRO-{ds.zero_stage}, {sharded} sharded" + (f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else "")
    return "DDP, each with a full replica of the model"


def release_sharding(trainer) -> None:
    """Let the main process load models on its own again once the other processes have finished.

    Under ZeRO-3 the Trainer registers a global DeepSpeed config that makes every later
    ``from_pretrained`` partition the weights across processes (a collective call).
    """
    if trainer.is_deepspeed_enabled:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def _layer_classes(model: torch.nn.Module) -> list[str]:
    """The decoder layer classes of ``model`` (what FSDP wraps one by one)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    if not names:
        raise UserError("cannot tell which layers of this model to shard; set distributed.fsdp.wrap_classes "
                        '(e.g. ["LlamaDecoderLayer"]).')
    return sorted(names)
