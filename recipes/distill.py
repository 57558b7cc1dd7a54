"""Logit distillation: a student learns the teacher's next-token distributions, not only its text.

The loss at every trained token is a divergence between the teacher's distribution p and the
student's q, both at temperature T (scaled by T², so gradients keep their size as T changes,
as in Hinton et al., 2015), mixed with the ordinary cross-entropy:

    loss = kd_weight · D(p, q) + (1 − kd_weight) · CE

* ``forward_kl``  KL(p ‖ q): mode-covering, the classic KD loss;
* ``reverse_kl``  KL(q ‖ p): mode-seeking;
* ``jsd``         generalized Jensen–Shannon of GKD (Agarwal et al., 2024):
                  β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with m = β·p + (1 − β)·q.

With ``top_k`` the teacher keeps its k most likely tokens per position (renormalised) and the
student is renormalised over the same support, so all three are proper divergences. Several
teachers are mixed as a weighted average of their distributions.

``mode: offline`` runs each teacher once over the training rows before training, stores its
top-k logits in the run folder (``teacher_logits/``) and frees it, so no teacher sits in memory
while the student trains; a resumed run reuses the stored logits. ``mode: online`` keeps the
teachers loaded and runs them on every batch (needed when ``top_k`` is null: the full vocabulary).

The student is any other recipe, given as ``student:`` (LoRA, DoRA, full, ...): it builds, saves
and reloads the trainable model exactly as it would on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, SerializeAsAny, field_validator, model_validator
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from tunelab.config.schema import Config, RecipeOptions, Section
from tunelab.data.collate import PadCollator
from tunelab.data.encode import IGNORE_INDEX, Encoded
from tunelab.errors import UserError
from tunelab.io import atomic_dir
from tunelab.synth.teacher import TeacherTraining

from .base import Recipe, register

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


class TeacherRef(Section):
    # A tunelab run folder (its trained adapter or model), a Hugging Face folder, a hub id or builtin:<name>.
    path: str
    weight: Annotated[float, Field(gt=0)] = 1.0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # When path holds no finished run yet: train it first, e.g. {config: configs/tiny/full.yaml}.
    train: TeacherTraining | None = None


class DistillOptions(RecipeOptions):
    teachers: list[TeacherRef] = []  # at least one (checked below; the empty default keeps `tunelab recipes` readable)
    loss: Divergence = "forward_kl"
    beta: Annotated[float, Field(gt=0, lt=1)] = 0.5  # jsd only: weight of the teacher side
    temperature: Annotated[float, Field(gt=0)] = 1.0
    kd_weight: Annotated[float, Field(ge=0, le=1)] = 1.0  # 1 = distillation only, 0 = plain cross-entropy
    mode: Literal["offline", "online"] = "offline"
    top_k: Annotated[int, Field(ge=1)] | None = 64  # null = the full vocabulary (online only)
    teacher_batch_size: Annotated[int, Field(ge=1)] = 16  # offline: rows per teacher forward pass
    # The recipe that trains the student, with its options, e.g. {name: lora, r: 16} or {name: full}.
    student: SerializeAsAny[RecipeOptions] = Field(default="lora", validate_default=True)

    @field_validator("student", mode="before")
    @classmethod
    def _student_recipe(cls, value: Any) -> RecipeOptions:
        from tunelab.config.load import parse_named_options
        from tunelab.recipes import get_recipe_class

        def student_options(name: str) -> type[RecipeOptions]:
            if name == "distill":
                raise UserError("recipe.student cannot itself be distill; choose the recipe that trains the student, e.g. lora")
            return get_recipe_class(name).Options

        options, errors = parse_named_options(value, "recipe.student", student_options, "{name: lora, r: 8}")
        if errors:
            raise ValueError(" ".join(errors))
        return options

    @model_validator(mode="after")
    def _offline_needs_top_k(self) -> DistillOptions:
        if not self.teachers:
            raise ValueError("recipe.teachers is empty; add at least one teacher, e.g. [{path: runs/teacher}]")
        if self.mode == "offline" and self.top_k is None:
            raise ValueError("recipe.mode offline stores the teachers' top-k logits, so recipe.top_k must be set "
                             "(e.g. 64); use mode online for the full vocabulary")
        return self


# ---- divergences ---------------------------------------------------------------------------


def teacher_distribution(teachers: list[tuple[torch.Tensor, torch.Tensor | None]], weights: list[float],
                         vocab: int, temperature: float) -> torch.Tensor:
    """Weighted mixture of the teachers' distributions at ``temperature`` as a dense [N, vocab] tensor.

    Each teacher is (logits [N, k], token ids [N, k]) for its top-k, or (logits [N, V], None);
    a top-k teacher is renormalised over its k tokens and is zero elsewhere. Same tokenizer does
    not mean same embedding width (some models pad it): ids at or past ``vocab`` never carry
    probability, and a full-width teacher is cut or padded to ``vocab``.
    """
    total = sum(weights)
    mixture = None
    for (logits, ids), weight in zip(teachers, weights, strict=True):
        logits = _at_least_fp32(logits)
        if ids is None:
            if logits.shape[-1] >= vocab:
                logits = logits[..., :vocab]
            else:
                logits = torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1)
        else:
            outside = ids >= vocab
            probs = torch.softmax(logits.masked_fill(outside, float("-inf")) / temperature, dim=-1)
            probs = torch.zeros(logits.shape[0], vocab, dtype=probs.dtype, device=probs.device).scatter_add_(
                -1, ids.long().masked_fill(outside, 0), probs.masked_fill(outside, 0.0))
        mixture = probs * (weight / total) if mixture is None else mixture + probs * (weight / total)
    return mixture


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def divergence(student_logits: torch.Tensor, teacher_probs: torch.Tensor, kind: str, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [N] between the teacher's ``teacher_probs`` and the student, times T².

    The student is renormalised over the tokens where the teacher has probability (all of them
    when the teacher's distribution is over the full vocabulary).
    """
    support = teacher_probs > 0
    log_q = torch.log_softmax((_at_least_fp32(student_logits) / temperature).masked_fill(~support, float("-inf")), dim=-1)
    log_p = torch.log(teacher_probs.clamp_min(1e-38))
    p, q = teacher_probs, log_q.exp()

    def kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return torch.where(support, a * (log_a - log_b), 0.0).sum(-1)

    if kind == "forward_kl":
        value = kl(p, log_p, log_q)
    elif kind == "reverse_kl":
        value = kl(q, log_q, log_p)
    else:
        log_m = torch.log((beta * p + (1 - beta) * q).clamp_min(1e-38))
        value = beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)
    return value * temperature**2


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L-1] mask of positions whose logits predict a trained token (label of the next position)."""
    return labels[:, 1:] != IGNORE_INDEX


def top_k_logits(logits: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, ids) of the k largest logits per row, or (logits, None) for the full vocabulary."""
    if k is None or k >= logits.shape[-1]:
        return _at_least_fp32(logits), None
    values, ids = torch.topk(_at_least_fp32(logits), k, dim=-1)
    return values, ids


# ---- offline teacher logits ------------------------------------------------------------------


def row_key(input_ids: list[int] | torch.Tensor) -> str:
    """Content key of one training row: its token ids."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).cpu().numpy()
    return hashlib.sha1(ids.tobytes()).hexdigest()


class TeacherLogits:
    """One teacher's top-k logits at every trained position of every training row, kept on disk.

    ``logits.safetensors`` holds two tensors, ``values`` and ``ids`` [positions, k]; ``index.json``
    maps each row's key to its first position and count, and records what the file was made from.
    """

    def __init__(self, folder: Path):
        tensors = load_file(folder / "logits.safetensors")
        self.values, self.ids = tensors["values"], tensors["ids"]
        self.index = json.loads((folder / "index.json").read_text())["rows"]

    @staticmethod
    def matches(folder: Path, meta: dict) -> bool:
        try:
            return json.loads((folder / "index.json").read_text())["meta"] == meta
        except (OSError, ValueError, KeyError):
            return False

    @staticmethod
    @torch.no_grad()
    def compute(folder: Path, meta: dict, teacher: torch.nn.Module, rows: list[Encoded], pad_token_id: int,
                top_k: int, batch_size: int) -> None:
        from tqdm.auto import tqdm

        unique = list({row_key(row.input_ids): row for row in rows}.items())
        collate, device = PadCollator(pad_token_id), next(teacher.parameters()).device
        values, ids, index, offset = [], [], {}, 0
        for start in tqdm(range(0, len(unique), batch_size), desc="teacher logits", unit="batch", dynamic_ncols=True):
            chunk = unique[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([row for _, row in chunk]).items()}
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            mask = trained_positions(batch["labels"])
            for b, (key, _) in enumerate(chunk):
                top_values, top_ids = top_k_logits(logits[b][mask[b]], top_k)
                values.append(top_values.cpu())
                ids.append(top_ids.to(torch.int32).cpu())
                index[key] = [offset, top_values.shape[0]]
                offset += top_values.shape[0]
        with atomic_dir(folder) as staging:
            save_file({"values": torch.cat(values).contiguous(), "ids": torch.cat(ids).contiguous()},
                      staging / "logits.safetensors")
            (staging / "index.json").write_text(json.dumps({"meta": meta, "rows": index}))

    def lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) for the trained positions of a right-padded batch, in row-major order."""
        values, ids = [], []
        for row, mask in zip(input_ids, attention_mask, strict=True):
            entry = self.index.get(row_key(row[mask.bool()]))
            if entry is None:
                raise UserError("a training row has no stored teacher logits (the data changed since they were computed); "
                                "delete the run's teacher_logits/ folder and train again.")
            start, count = entry
            values.append(self.values[start : start + count])
            ids.append(self.ids[start : start + count])
        return torch.cat(values), torch.cat(ids)


def _main_process_first() -> contextlib.AbstractContextManager:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # the process group tunelab's trainer core already joined

        return PartialState().main_process_first()
    return contextlib.nullcontext()


@register
class Distill(Recipe):
    name = "distill"
    description = ("Logit distillation from one or more teachers (forward/reverse KL, JSD; offline top-k cache or "
                   "online) into a student trained by any other recipe.")
    Options = DistillOptions
    artifact = "adapter"  # per run: the student recipe's artifact (set in __init__)
    typical_trainable = "that of the student recipe"
    needs_logits = True
    options: DistillOptions

    def __init__(self, options: DistillOptions):
        super().__init__(options)
        from tunelab.recipes import get_recipe_class

        self.student = get_recipe_class(options.student.name)(options.student)
        self.artifact = self.student.artifact
        self.merge_refusal = self.student.merge_refusal
        if self.student.name in ("bitfit", "qlora") and not self.merge_refusal:
            # tunelab merge applies their special handling (added biases, the NF4 base) by recipe name.
            self.merge_refusal = (f"its student was trained with {self.student.name}, whose merge tunelab applies only to "
                                  f"{self.student.name} runs; serve the student with tunelab generate RUN instead.")
        self.teachers: list[torch.nn.Module] = []  # online mode
        self.stored: list[TeacherLogits] = []  # offline mode

    # -- delegated to the student recipe --
    def check(self, config: Config) -> None:
        if config.data.packing:
            raise UserError("recipe distill matches teacher logits to whole training rows, so data.packing must be false.")
        self.student.check(config)

    def load_kwargs(self, config: Config) -> dict[str, Any]:
        return self.student.load_kwargs(config)

    def callbacks(self, config: Config) -> list[TrainerCallback]:
        return self.student.callbacks(config)

    def loss_terms(self, model, inputs):
        return self.student.loss_terms(model, inputs)

    def log_metrics(self, model) -> dict[str, float]:
        return self.student.log_metrics(model)

    def save(self, model, directory: Path, state_dict=None) -> None:
        self.student.save(model, directory, state_dict)

    def load_artifact(self, base, directory: Path):
        return self.student.load_artifact(base, directory)

    # -- the distillation itself --
    def build(self, model: torch.nn.Module, config: Config) -> torch.nn.Module:
        from tunelab.models.load import load_tokenizer
        from tunelab.synth.teacher import check_same_tokenizer, load_teacher

        student_tokenizer = load_tokenizer(config.model)
        rows = self._training_rows(config, student_tokenizer) if self.options.mode == "offline" else []
        for index, ref in enumerate(self.options.teachers):
            key = f"recipe.teachers[{index}].path"
            folder = Path(config.output_dir or ".") / "teacher_logits" / f"teacher{index}"
            meta = {"teacher": ref.path, "dtype": ref.dtype, "top_k": self.options.top_k, "rows": len(rows),
                    "data": hashlib.sha1("".join(sorted(row_key(r.input_ids) for r in rows)).encode()).hexdigest()}
            with _main_process_first():  # several processes: the main one computes, the others read
                if self.options.mode == "offline" and TeacherLogits.matches(folder, meta):
                    self.stored.append(TeacherLogits(folder))  # a resumed run (or another process) computed them
                    continue
                teacher, tokenizer = load_teacher(ref.path, key, ref.dtype, ref.train)
                check_same_tokenizer(tokenizer, student_tokenizer, f'{key} "{ref.path}"',
                                     f'model "{config.model.name_or_path}"')
                if self.options.mode == "online":
                    self.teachers.append(teacher)
                    continue
                print(f"tunelab: distill: computing top-{self.options.top_k} logits of teacher {ref.path} "
                      f"on {len(rows)} rows (once; stored in {folder})")
                TeacherLogits.compute(folder, meta, teacher, rows, student_tokenizer.pad_token_id, self.options.top_k,
                                      self.options.teacher_batch_size)
                del teacher  # offline: the teacher leaves memory before the student trains
                self.stored.append(TeacherLogits(folder))
        return self.student.build(model, config)

    @staticmethod
    def _training_rows(config: Config, tokenizer) -> list[Encoded]:
        """The tokenized training rows exactly as the trainer will see them (same cache, same template)."""
        from tunelab.data.cache import cached_splits
        from tunelab.data.encode import build_splits
        from tunelab.data.templates import apply_template_choice

        if any(source.format != "text" for source in config.data.datasets + config.data.eval_datasets):
            apply_template_choice(tokenizer, config.data.chat_template)
        splits, _ = cached_splits(config.data, tokenizer, config.training.seed, build_splits)
        return splits.train

    def teacher_side(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each teacher's (logits, ids) at the trained positions of this batch."""
        if self.stored:
            pairs = [stored.lookup(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()) for stored in self.stored]
            device = inputs["input_ids"].device
            return [(values.to(device), ids.to(device)) for values, ids in pairs]
        out = []
        with torch.no_grad():
            for teacher in self.teachers:
                teacher.to(inputs["input_ids"].device)
                logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
                out.append(top_k_logits(logits[mask], self.options.top_k))
        return out

    def objective(self, model, inputs, outputs, lm_loss, token_divisor):
        o = self.options
        mask = trained_positions(inputs["labels"])
        # Soft-prompt students return logits for their virtual tokens first; keep the real ones.
        student = outputs.logits[:, -inputs["input_ids"].shape[1] :][:, :-1][mask]
        probs = teacher_distribution(self.teacher_side(inputs, mask), [t.weight for t in o.teachers],
                                     student.shape[-1], o.temperature)
        kd_sum = divergence(student, probs, o.loss, o.temperature, o.beta).sum()
        n_tokens = mask.sum().clamp(min=1)
        loss = o.kd_weight * kd_sum / token_divisor + (1 - o.kd_weight) * lm_loss
        return loss, {"kd_loss": kd_sum.detach() / n_tokens, "ce_loss": lm_loss.detach() * token_divisor / n_tokens}
