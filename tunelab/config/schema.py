"""The typed config schema: one pydantic model per YAML section.

Every model forbids unknown keys (a typo must never be silently dropped) and is
frozen (a run's config cannot drift after validation). Recipe options are not
declared here: each recipe in ``recipes/`` owns its options model, so adding a
method never touches this file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from tunelab.data.formats import FORMAT_FIELDS
from tunelab.data.templates import TEMPLATES
from tunelab.errors import did_you_mean


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipeOptions(Section):
    """Base of every recipe's options; ``name`` selects the recipe in the registry."""

    name: str


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id (org/name), local folder, or a built-in model such as 'builtin:tiny-llama'."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None


DatasetFormat = Literal[tuple(FORMAT_FIELDS)]  # type: ignore[valid-type]


class DatasetSource(Section):
    path: str = Field(description="Local file, glob or folder (jsonl/json/csv/parquet/txt), or a hub dataset id.")
    format: DatasetFormat
    split: str = "train"
    name: str | None = None
    data_files: str | list[str] | None = None
    max_samples: Annotated[int, Field(ge=1)] | None = None
    # Multiplies this source's rows in the mix: 0.5 keeps a random half, 2.0 repeats every row twice.
    weight: Annotated[float, Field(gt=0)] = 1.0
    # The format's field names mapped to this dataset's column names, e.g. {prompt: question}.
    fields: dict[str, str] = {}
    # A system message for chat rows that have none.
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _fields_belong_to_format(self) -> DatasetSource:
        known = FORMAT_FIELDS[self.format]
        for name in self.fields:
            if name not in known:
                raise ValueError(
                    f'fields key "{name}" is not a field of format {self.format}{did_you_mean(name, known)}; '
                    f"its fields are: {', '.join(known)}"
                )
        if self.system_prompt is not None and self.format == "text":
            raise ValueError("system_prompt applies to chat formats, not to format text; remove it")
        return self


class DataConfig(Section):
    datasets: Annotated[list[DatasetSource], Field(min_length=1)]
    eval_datasets: list[DatasetSource] = []
    eval_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_length: Annotated[int, Field(ge=8)] = 512
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    train_on_inputs: bool = False
    # Which assistant turns of a multi-turn chat carry loss.
    assistant_turns: Literal["all", "last"] = "all"
    # Concatenate examples into rows of up to max_length; each example attends only to itself.
    packing: bool = False
    # Reuse tokenized data from $TUNELAB_CACHE/data when files, tokenizer and data settings are unchanged.
    cache: bool = True
    chat_template: Literal[tuple(TEMPLATES)] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="None uses the tokenizer's own template; a built-in name ('chatml') replaces it.",
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval_datasets and self.eval_ratio > 0:
            raise ValueError(
                "data.eval_datasets and data.eval_ratio are both set; keep one of them "
                "(a held-out split is taken either from its own source or by ratio)"
            )
        return self


class TrainingConfig(Section):
    seed: int = 42
    num_epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=1)] | None = None
    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    # adamw_bnb_8bit and paged_* come from bitsandbytes (pip install "tunelab[quant]"); paged_* need CUDA.
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"
    ] = "adamw_torch"
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    logging_steps: Annotated[int, Field(ge=1)] = 1
    save_steps: Annotated[int, Field(ge=1)] | None = None
    save_total_limit: Annotated[int, Field(ge=1)] = 2
    gradient_checkpointing: bool = False
    # Fused LoRA layers and linear cross-entropy (tunelab.kernels):
    #   auto   = Triton kernels on a CUDA GPU, the PyTorch memory-saving path on a CPU
    #   triton = require Triton (an error without a CUDA GPU, unless TRITON_INTERPRET=1)
    #   torch  = the PyTorch autograd path (recompute instead of store) on any device
    #   off    = PEFT's own LoRA layers and the unfused loss
    kernels: Literal["auto", "triton", "torch", "off"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _kernels_off(cls, data):
        # YAML 1.1 reads a bare `off` as false; `kernels: off` must still mean "off".
        if isinstance(data, dict) and data.get("kernels") is False:
            data = {**data, "kernels": "off"}
        return data

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                "training.warmup_steps and training.warmup_ratio are both set; keep one of them"
            )
        return self


class EvalConfig(Section):
    """Held-out metrics measured before and after training on the eval split."""

    before_training: bool = True
    exact_match: bool = True
    max_samples: Annotated[int, Field(ge=1)] = 200
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    batch_size: Annotated[int, Field(ge=1)] = 32
    # Data of a skill the base already has (e.g. its pretraining text): held-out loss on it is
    # measured before and after training, so forgetting shows as retention_after - retention_before.
    retention_datasets: list[DatasetSource] = []


class WandbConfig(Section):
    project: str = "tunelab"
    entity: str | None = None
    name: str | None = Field(default=None, description="Run name; default: the run folder's name.")
    tags: list[str] = []
    notes: str | None = None
    # auto: online when W&B credentials exist, else offline (synced later with `wandb sync`).
    mode: Literal["auto", "online", "offline"] = "auto"


class TrackingConfig(Section):
    """Where metrics go besides metrics.jsonl (always written)."""

    wandb: WandbConfig | None = None
    tensorboard: bool = False


class FsdpConfig(Section):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state are
    sharded across processes and each decoder layer is gathered only while it runs."""

    # Free a layer's gathered weights after its forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    # Keep the sharded parameters in CPU memory between uses (slower; fits larger models).
    cpu_offload: bool = False
    # Layer classes that become one shard unit each; none = the model's own list (_no_split_modules).
    wrap_classes: list[str] = []


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO: stage 2 shards gradients and optimizer state, stage 3 the parameters too."""

    zero_stage: Literal[2, 3] = 2
    # Optimizer state (and its update) in CPU memory.
    offload_optimizer: bool = False
    # Parameters in CPU memory between uses; stage 3 only.
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                "distributed.deepspeed.offload_params needs zero_stage 3 (stage 2 keeps a full copy of the "
                "parameters on every process); set zero_stage: 3 or offload_params: false"
            )
        return self


class DistributedConfig(Section):
    """How several processes (``--nproc N``, torchrun, accelerate launch) share the work."""

    # ddp: every process holds the whole model; fsdp / deepspeed: the training state is sharded.
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: FsdpConfig = FsdpConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()


class Config(Section):
    model: ModelConfig
    recipe: SerializeAsAny[RecipeOptions]
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()
    output_dir: str | None = Field(default=None, description="Run directory; the CLI defaults it to runs/<config name>.")

