"""The trainer core: one config in, one complete run directory out.

Read top to bottom it is the whole run: data, model, recipe, metrics before,
HF ``Trainer`` (under accelerate: accumulation, schedulers, checkpoints), metrics
after, artifact, summary. Recipes change behaviour only through their hooks:
``build``, ``callbacks``, ``objective``, ``loss_terms``, ``log_metrics`` and ``save``.

Run directory::

    config.yaml      fully resolved config (reloadable: tunelab train RUN/config.yaml)
    metrics.jsonl    one JSON object per logged step
    summary.json     final loss, eval before/after, wall time, tokens/s, memory, parameters
    loss.png         the loss curve
    adapter/ | model/  the trained artifact with its tokenizer
    checkpoints/     Trainer checkpoints (resumable with --resume)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase, ProgressCallback, TrainingArguments, set_seed

from tunelab.config import Config, config_to_yaml
from tunelab.data.cache import cached_splits
from tunelab.data.collate import PadCollator
from tunelab.data.encode import Splits, build_splits, encode_sources
from tunelab.data.packing import PackCollator, pack_with_report
from tunelab.data.templates import apply_template_choice
from tunelab.errors import UserError
from tunelab.eval.heldout import exact_match, heldout_loss
from tunelab.io import atomic_dir, atomic_write_text
from tunelab.kernels.backend import resolve as resolve_kernels
from tunelab.kernels.patch import patch_model
from tunelab.launch.strategy import check_strategy, describe_strategy, release_sharding, uses_cpu_mode
from tunelab.launch.strategy import training_arguments as strategy_arguments
from tunelab.models.load import dtype_hint, load_model, load_tokenizer
from tunelab.models.trained import load_trained
from tunelab.recipes import get_recipe_class
from tunelab.train.callbacks import ConsoleProgress, MetricsLogger
from tunelab.train.processes import Processes
from tunelab.train.report import write_loss_plot
from tunelab.train.stopping import GracefulStop, RunInterrupted, stop_on_signals
from tunelab.train.tracking import AttachConfig, report_to
from tunelab.train.trainer import RecipeTrainer


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def train(
    config: Config,
    output_dir: str | Path | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> TrainResult:
    """Run ``config`` end to end; the summary is also written to ``summary.json``."""
    started = time.perf_counter()
    if not (output_dir or config.output_dir):
        raise UserError("no run directory: set output_dir in the config or pass --output.")
    run_dir = Path(output_dir or config.output_dir)
    procs = Processes(config.distributed)
    check_strategy(config, procs.world_size)
    if procs.is_main:
        _prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    procs.barrier()

    with procs.main_first():
        tokenizer = load_tokenizer(config.model)
        if any(source.format != "text" for source in config.data.datasets + config.data.eval_datasets):
            apply_template_choice(tokenizer, config.data.chat_template)
        splits, from_cache = cached_splits(config.data, tokenizer, config.training.seed, build_splits)
    if from_cache:
        procs.print("tunelab: data: tokenized examples reused from the cache (same files, tokenizer and data settings)")
    retention = encode_sources(
        config.data, config.eval.retention_datasets, "eval.retention_datasets", tokenizer, Counter()
    )[: config.eval.max_samples]
    if config.data.packing:
        train_rows, packing_stats, packing_line = pack_with_report(
            splits.train, config.data.max_length, config.training.micro_batch_size
        )
        splits.stats.update(packing_stats)
        collator = PackCollator(tokenizer.pad_token_id)
    else:
        train_rows, collator = splits.train, PadCollator(tokenizer.pad_token_id)
    # The saved config records what this run really did: its folder and its step count,
    # so `tunelab train RUN/config.yaml` reproduces it even when CLI flags shaped it.
    config = _effective_config(config, run_dir, len(train_rows), max_steps)
    if resume and not allow_config_change:
        _refuse_changed_config(run_dir, config)
    if procs.is_main:
        atomic_write_text(run_dir / "config.yaml", config_to_yaml(config))

    recipe = get_recipe_class(config.recipe.name)(config.recipe)
    check_optimizer(config.training.optimizer)
    resolve_kernels(config.training.kernels)  # a refused training.kernels fails before the model loads
    if hint := dtype_hint(config.model):
        procs.print(hint)
    with procs.main_first():
        base = load_model(config.model, **recipe.load_kwargs(config))
    set_seed(config.training.seed)  # after loading, so adapter init never depends on what loading drew
    model = recipe.build(base, config)
    procs.print(patch_model(model, config.training.kernels, config.distributed.strategy).describe())
    trainable, total = _count_parameters(model)
    if trainable == 0:
        raise UserError(f'recipe "{recipe.name}" left no trainable parameters; check recipe.target_modules and its options.')
    procs.print(f"tunelab: recipe {recipe.name}: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%}); "
          f"{len(splits.train)} train / {len(splits.eval)} eval examples")
    if config.data.packing:
        procs.print(f"tunelab: {packing_line}")

    checkpoint = _last_checkpoint(run_dir) if resume else None
    metrics = MetricsLogger(run_dir / "metrics.jsonl", resume_step=_checkpoint_step(checkpoint), writer=procs.is_main)
    trainer = RecipeTrainer(
        recipe=recipe,
        model=model,
        args=_training_arguments(config, run_dir, model),
        train_dataset=train_rows,
        data_collator=collator,
        callbacks=[metrics, *recipe.callbacks(config)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ConsoleProgress())
    stopper = GracefulStop()
    trainer.add_callback(stopper)
    if procs.world_size > 1 or config.distributed.strategy != "ddp":
        procs.print(f"tunelab: {procs.world_size} process{'es' if procs.world_size > 1 else ''} ({trainer.accelerator.distributed_type.value}): "
                    f"{describe_strategy(config.distributed)}")
    if config.tracking.wandb is not None:
        trainer.add_callback(AttachConfig(config))

    # Measured after the Trainer has placed the model on its device, by the main process only.
    eval_before = _evaluate(model, tokenizer, splits, config) if config.eval.before_training and procs.is_main else None
    if eval_before:
        print(f"tunelab: before training: {_describe(eval_before)}")
    retention_before = _retention(model, retention, tokenizer, config) if procs.is_main else None
    with stop_on_signals(stopper):
        trainer.train(resume_from_checkpoint=checkpoint)
    if stopper.signal_number is not None:
        name = signal.Signals(stopper.signal_number).name
        raise RunInterrupted(
            f"tunelab: stopped by {name} after step {trainer.state.global_step}; checkpoint saved in "
            f"{_last_checkpoint(run_dir)}.\ntunelab: resume with: tunelab train {run_dir / 'config.yaml'} "
            f"--output {run_dir} --resume" + (f" --nproc {procs.world_size}" if procs.world_size > 1 else ""),
            exit_code=128 + stopper.signal_number,
        )

    # Gathered from every process's shards (a collective step); the main process writes it.
    state_dict = trainer.full_state_dict()
    if not procs.is_main:  # the main process evaluates and writes the results
        procs.finish()
        return TrainResult(run_dir, {}, model, tokenizer)
    with atomic_dir(run_dir / recipe.artifact) as staging:
        recipe.save(model, staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # The trained weights live in shards across processes; the main process evaluates the
        # saved artifact instead, which also proves that it loads on its own.
        release_sharding(trainer)
        model = load_trained(run_dir)[0]
    eval_after = _evaluate(model, tokenizer, splits, config)
    retention_after = _retention(model, retention, tokenizer, config)
    if retention_before and retention_after:
        print(f"tunelab: retention (prior-skill held-out loss) {retention_before['loss']:.4f} -> {retention_after['loss']:.4f}")
    if eval_after:
        print(f"tunelab: after training:  {_describe(eval_after)}")
    if eval_before and eval_after and "exact_match" in eval_after:
        before, after = eval_before["exact_match"], eval_after["exact_match"]
        print(f"tunelab: held-out exact match {before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points)")

    summary = {
        "recipe": recipe.name,
        "model": config.model.name_or_path,
        "steps": trainer.state.global_step,
        "train_loss_first": metrics.records[0]["loss"] if metrics.records else None,
        "train_loss_final": metrics.records[-1]["loss"] if metrics.records else None,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "retention_before": retention_before,
        "retention_after": retention_after,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(trainer.state.log_history[-1].get("train_runtime", 0.0), 2) if trainer.state.log_history else None,
        "tokens_per_s": _mean_tokens_per_s(metrics.records),
        "peak_memory_mb": _peak_memory_mb(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_examples": len(splits.train),
        "eval_examples": len(splits.eval),
        "data": dict(splits.stats),
        "artifact": recipe.artifact,
        "processes": procs.world_size,
        "strategy": config.distributed.strategy,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_loss_plot(metrics.records, run_dir / "loss.png", title=f"{recipe.name} — {config.model.name_or_path}")
    print(f"tunelab: run saved to {run_dir} ({recipe.artifact}/, summary.json, metrics.jsonl, loss.png)")
    procs.finish()
    return TrainResult(run_dir, summary, model, tokenizer)


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output directory {run_dir} is a file; choose another --output.")
    if resume:
        for stale in (run_dir / "checkpoints").glob(".staging-*"):  # a save cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        if _last_checkpoint(run_dir) is None:
            raise UserError(
                f"--resume was given but {run_dir / 'checkpoints'} holds no checkpoint; drop --resume to start a new run."
            )
        return
    # A folder "holds a run" once it has a checkpoint or a summary; leftovers of a run that
    # failed before either (e.g. a config error found while loading data) are simply replaced.
    holds_run = (run_dir / "summary.json").exists() or _last_checkpoint(run_dir) is not None
    if holds_run and not overwrite:
        raise UserError(
            f"output directory {run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output."
        )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


RESUMABLE_CHANGES = {"training.max_steps", "training.num_epochs"}


def _refuse_changed_config(run_dir: Path, config: Config) -> None:
    """Resuming under different settings would silently mix two runs; name what differs."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    now = yaml.safe_load(config_to_yaml(config))
    changed = sorted(_differences(saved, now))
    # Training longer (or shorter) is what resuming a finished run is for; everything else must match.
    for key in RESUMABLE_CHANGES.intersection(changed):
        old, new = saved["training"][key.split(".")[1]], now["training"][key.split(".")[1]]
        print(f"tunelab: note: {key} changed from {old} to {new}; the learning-rate schedule follows the new length.")
    changed = [key for key in changed if key not in RESUMABLE_CHANGES]
    if changed:
        raise UserError(
            f"--resume: the config differs from the one {run_dir} was trained with at {', '.join(changed)}; "
            "resume with the run's own config.yaml, or pass --allow-config-change to continue anyway."
        )


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = old.keys() | new.keys()
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if old != new else []


def _last_checkpoint(run_dir: Path) -> str | None:
    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def _checkpoint_step(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def _effective_config(config: Config, run_dir: Path, n_train: int, max_steps_cap: int | None) -> Config:
    """Fix the run folder and the optimizer-step count (epochs or max_steps, capped by --max-steps)."""
    t = config.training
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches_per_epoch = math.ceil(n_train / (t.micro_batch_size * world_size))
    steps = t.max_steps or math.ceil(t.num_epochs * math.ceil(batches_per_epoch / t.gradient_accumulation_steps))
    if max_steps_cap is not None:
        steps = min(steps, max_steps_cap)
    training = t.model_copy(update={"max_steps": steps})
    return config.model_copy(update={"training": training, "output_dir": str(run_dir)})


def _training_arguments(config: Config, run_dir: Path, model: torch.nn.Module) -> TrainingArguments:
    t = config.training
    arguments = dict(
        output_dir=str(run_dir / "checkpoints"),
        seed=t.seed,
        max_steps=t.max_steps,  # always set: _effective_config turned epochs into steps
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio or t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must show as NaN (the Trainer would log a made-up value)
        save_strategy="steps",
        # No save_steps means one checkpoint, at the end (the Trainer always saves the final step).
        save_steps=t.save_steps or 10**9,
        save_total_limit=t.save_total_limit,
        gradient_checkpointing=t.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to=report_to(config, run_dir) or "none",
        run_name=(config.tracking.wandb.name if config.tracking.wandb else None) or run_dir.name,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=uses_cpu_mode(config.distributed),  # multi-process CPU runs need it to form a gloo group
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in each forward
        disable_tqdm=False,
    )
    arguments.update(strategy_arguments(config, model))
    return TrainingArguments(**arguments)


def _evaluate(model: torch.nn.Module, tokenizer, splits: Splits, config: Config) -> dict | None:
    if not splits.eval:
        return None
    examples = splits.eval[: config.eval.max_samples]
    result = heldout_loss(model, examples, tokenizer.pad_token_id, config.eval.batch_size)
    if config.eval.exact_match:
        result |= exact_match(model, tokenizer, examples, config.eval.max_new_tokens, config.eval.batch_size)
    return result


def _retention(model: torch.nn.Module, examples: list, tokenizer, config: Config) -> dict | None:
    return heldout_loss(model, examples, tokenizer.pad_token_id, config.eval.batch_size) if examples else None


def _describe(result: dict) -> str:
    text = f"eval loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f})"
    if "exact_match" in result:
        text += f", exact match {result['exact_match']:.1%} of {result['exact_match_n']}"
    return text


def check_optimizer(optimizer: str) -> None:
    """bitsandbytes optimizers need the package; paged ones page state to host memory and need CUDA."""
    if "bnb" not in optimizer and not optimizer.startswith("paged_"):
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f'training.optimizer "{optimizer}" comes from bitsandbytes, which is not installed; '
            'run pip install "tunelab[quant]" or choose adamw_torch.'
        )
    if optimizer.startswith("paged_") and not torch.cuda.is_available():
        raise UserError(
            f'training.optimizer "{optimizer}" pages optimizer state between GPU and CPU memory and needs a CUDA GPU; '
            "on this machine use adamw_bnb_8bit (8-bit states) or adamw_torch."
        )


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a bitsandbytes 4-bit tensor packs two weights per byte of storage."""

    def real_numel(p: torch.nn.Parameter) -> int:
        if type(p).__name__ == "Params4bit":
            return p.numel() * 2 * p.element_size()
        return p.numel()

    trainable = sum(real_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(real_numel(p) for p in model.parameters())


def _mean_tokens_per_s(records: list[dict]) -> float | None:
    # The first logged interval includes start-up (compilation, allocator warm-up); skip it when possible.
    rates = [r["tokens_per_s"] for r in records[1:] or records]
    return round(sum(rates) / len(rates), 1) if rates else None


def _peak_memory_mb() -> dict:
    peak = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["cuda"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak
