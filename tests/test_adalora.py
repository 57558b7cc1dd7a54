"""AdaLoRA: the rank allocator runs every step on schedule, the penalty is optimized, ranks reload."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli
from peft.tuners.adalora import AdaLoraLayer
from recipe_helpers import LAYERS, LINEARS, REPO, train_tiny
from safetensors.torch import load_file
from transformers import TrainingArguments
from tunelab.recipes import get_recipe_class
from tunelab.recipes.adalora import total_rank

from tunelab.config import parse_config
from tunelab.data.collate import PadCollator
from tunelab.data.encode import Encoded
from tunelab.models.trained import load_trained
from tunelab.train.trainer import RecipeTrainer

MODULES = LAYERS * len(LINEARS)
INIT_R, TARGET_R, TINIT, TFINAL, STEPS = 12, 4, 6, 12, 30  # configs/tiny/adalora.yaml, run for 30 steps


def expected_budget(step: int) -> int:
    """The paper's cubic schedule (Zhang et al., 2023, eq. 12), as a total over all layers."""
    start, end = INIT_R * MODULES, TARGET_R * MODULES
    if step <= TINIT:
        return start
    if step >= STEPS - TFINAL:
        return end
    progress = (step - TINIT) / (STEPS - TFINAL - TINIT)
    return int((start - end) * (1 - progress) ** 3 + end)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny("adalora", tmp_path_factory.mktemp("adalora"), steps=STEPS)


def test_rank_budget_follows_the_schedule_every_step(run):
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    ranks = [r["adalora_total_rank"] for r in records]
    # The rank logged after step s was set by update_and_allocate at the end of step s (global step s-1).
    assert ranks == [expected_budget(r["step"] - 1) for r in records]
    assert ranks[0] == INIT_R * MODULES and ranks[-1] == TARGET_R * MODULES
    assert len(set(ranks)) > 5  # it moved step by step, not in one jump
    assert total_rank(run.model) == TARGET_R * MODULES


def test_orthogonality_penalty_is_in_the_optimized_loss(run, tmp_path):
    model = run.model.train()
    trainer = RecipeTrainer(
        recipe=_recipe(run), model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
        data_collator=PadCollator(run.tokenizer.pad_token_id),
    )
    rows = [Encoded(input_ids=[5, 6, 7, 8, 9], labels=[-100, -100, 7, 8, 9])] * 2
    batch = PadCollator(run.tokenizer.pad_token_id)(rows)
    optimized = trainer.compute_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    penalty = []
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            a, b = module.lora_A["default"], module.lora_B["default"]
            penalty.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])))
            penalty.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])))
    expected = lm_loss + 0.5 * torch.stack(penalty).mean()
    assert float(optimized) == pytest.approx(float(expected), rel=1e-5)
    assert float(optimized - lm_loss) > 0.01


def _recipe(run):
    config = parse_config(yaml.safe_load((run.run_dir / "config.yaml").read_text()))
    return get_recipe_class("adalora")(config.recipe)


def test_final_rank_pattern_is_saved_and_reloads(run):
    adapter = run.run_dir / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    assert len(pattern) == MODULES and sum(sum(mask) for mask in pattern.values()) == TARGET_R * MODULES
    weights = load_file(adapter / "adapter_model.safetensors")
    # Saved matrices are cut to the learned ranks.
    assert sum(t.shape[0] for k, t in weights.items() if k.endswith("lora_E")) == TARGET_R * MODULES
    reloaded, _ = load_trained(run.run_dir)
    assert total_rank(reloaded) == TARGET_R * MODULES


@pytest.mark.parametrize(("override", "message"), [
    ("recipe.target_r=16", "target_r (16) is larger than init_r (12)"),
    ("training.max_steps=15", "leave no pruning phase in a run of 15 optimizer steps"),
])
def test_impossible_schedules_are_refused(override, message, capsys):
    code, _, err = run_cli(capsys, "validate", str(REPO / "configs/tiny/adalora.yaml"), override)
    assert code == 2 and message in err


@pytest.mark.parametrize("resume_at", [6, 9])  # mid-budgeting (importance estimates), after the final allocation (rank pattern)
def test_resume_continues_the_rank_allocation_exactly(resume_at, tmp_path):
    """A run cut back to a checkpoint resumes to the uninterrupted losses, ranks and adapter.

    AdaLoRA's pruning depends on state outside the weights and optimizer: smoothed importance
    estimates while the budget shrinks, then the fixed rank pattern. Both travel in checkpoints.
    """
    import shutil

    from tunelab.config import load_config
    from tunelab.train.run import train

    overrides = ["training.max_steps=12", "training.save_steps=3", "training.save_total_limit=5",
                 "training.logging_steps=1", "recipe.tinit=2", "recipe.tfinal=4", "recipe.delta_t=1",
                 "eval.before_training=false", "eval.exact_match=false", "eval.max_samples=8"]
    config = load_config(REPO / "configs/tiny/adalora.yaml", overrides)
    whole = train(config, output_dir=tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    for later in range(resume_at + 3, 13, 3):
        shutil.rmtree(cut / "checkpoints" / f"checkpoint-{later}")
    shutil.rmtree(cut / "adapter")
    (cut / "metrics.jsonl").write_text("".join((cut / "metrics.jsonl").read_text().splitlines(True)[:resume_at]))
    resumed = train(load_config(cut / "config.yaml"), output_dir=cut, resume=True, allow_config_change=True)

    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("whole", "cut")}
    assert [r["step"] for r in records["cut"]] == list(range(1, 13))
    for a, b in zip(records["whole"], records["cut"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a["step"], a["loss"], b["loss"])
        assert a["adalora_total_rank"] == b["adalora_total_rank"], a["step"]
    assert whole.model.peft_config["default"].rank_pattern == resumed.model.peft_config["default"].rank_pattern
    saved = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("whole", "cut")]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        assert torch.allclose(saved[0][key], saved[1][key], rtol=0, atol=1e-6), key
