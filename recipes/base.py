"""The recipe interface and its registry.

A recipe turns a loaded base model into a trainable one and says how its result
is saved. It owns its options model (validated with the rest of the config, so a
typo in ``recipe.*`` gets the same "did you mean" help as any other key) and its
cross-field rules. Adding a method means adding one module to ``recipes/`` that
defines a ``Recipe`` subclass decorated with ``@register``; nothing else changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from tunelab.config.schema import RecipeOptions

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback

    from tunelab.config.schema import Config

REGISTRY: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe selectable by ``recipe.name`` in configs."""
    if cls.name in REGISTRY:
        raise RuntimeError(f"two recipes are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


class Recipe:
    """One fine-tuning method. Subclasses set the class attributes and ``build``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[RecipeOptions]]
    # "adapter": only the trained weights are saved (RUN_DIR/adapter);
    # "model": the whole trained model is saved (RUN_DIR/model).
    artifact: ClassVar[Literal["adapter", "model"]]
    # Why `tunelab merge` refuses this method's artifact, and what to do instead ("" = it merges:
    # the result is a plain model with no extra inference cost).
    merge_refusal: ClassVar[str] = ""
    # Share of parameters trained with the default options, on a Llama-3-8B-shaped model
    # (for `tunelab recipes`; the exact count of a run is printed and saved in summary.json).
    typical_trainable: ClassVar[str]

    @classmethod
    def mergeable(cls) -> bool:
        return not cls.merge_refusal

    def __init__(self, options: RecipeOptions):
        self.options = options

    def check(self, config: Config) -> None:
        """Raise ``UserError`` for option combinations that cannot work with ``config``.

        Runs in ``tunelab validate`` before any model loads.
        """

    def load_kwargs(self, config: Config) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments the method needs (e.g. a 4-bit quantization config)."""
        return {}

    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        """Return the trainable model (e.g. wrapped in PEFT) built from the base."""
        raise NotImplementedError

    def callbacks(self, config: Config) -> list[TrainerCallback]:
        """Extra trainer hooks the method needs (e.g. a rank schedule after each optimizer step)."""
        return []

    def loss_terms(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted regularisers added to the language-model loss of the batch just run.

        Called by the trainer right after the forward pass; each term is optimized and
        logged under its name. None by default.
        """
        return {}

    # True when ``objective`` reads ``outputs.logits``: the trainer must then run the plain
    # forward pass, never a fused loss path that skips materialising the logits.
    needs_logits: ClassVar[bool] = False

    def objective(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], outputs: Any, lm_loss: torch.Tensor,
        token_divisor: torch.Tensor | float,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to optimise for the batch just run, and values to log beside it (not added to the loss).

        Called by the trainer after the forward pass with the model's ``outputs`` and its language-model
        loss. A per-token sum divided by ``token_divisor`` is on the scale of ``lm_loss`` (the Trainer's
        normalisation for gradient accumulation and several processes). Default: the LM loss unchanged.
        Distillation replaces it with a mix of a divergence from the teacher and the LM loss.
        """
        return lm_loss, {}

    def log_metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """Values written with the loss at every logging step (e.g. rank budget, gate statistics)."""
        return {}

    @contextlib.contextmanager
    def checkpointing(self, model: torch.nn.Module, directory: Path, write: bool) -> Iterator[None]:
        """Wraps the Trainer's writing of a checkpoint into ``directory`` (a staging folder).

        For training state of the method that the Trainer does not save (weights, optimizer,
        scheduler, RNG and data position it does): adjust what the Trainer writes before
        yielding, add files after it (only when ``write``: the main process). Nothing by default.
        """
        yield

    def load_checkpoint_state(self, model: torch.nn.Module, directory: Path) -> None:
        """Restore what ``checkpointing`` added, before a resumed run continues from ``directory``."""

    def save(self, model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained artifact into ``directory`` (an empty staging folder).

        ``state_dict`` is the full state dict gathered from the processes' shards when the model
        was sharded (FSDP, ZeRO): the model's own parameters then hold only a shard. ``None``
        means the model holds all its weights.
        """
        model.save_pretrained(directory, state_dict=state_dict)

    def load_artifact(self, base: torch.nn.Module, directory: Path) -> torch.nn.Module:
        """Rebuild the trained model from the base and what ``save`` wrote (PEFT adapters by default)."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory)
