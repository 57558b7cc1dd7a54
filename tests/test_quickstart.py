"""The quickstart, as `make quickstart` runs it: pretrain a counting base, then teach a chat skill with LoRA.

This is the project's main job, so CI runs it in full (about 2 minutes on 2 CPU cores).
Stated margins: held-out exact match at most 5% before LoRA and at least 60% after
(measured: 0% -> 94%); the same LoRA on the untrained base stays at most 30% (measured: 10%),
which shows the skill is built on what pretraining taught, not learned from scratch.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.config import load_config
from tunelab.train.run import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quickstart_teaches_a_new_skill(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # the configs use repository-relative data paths
    base = train(load_config(CONFIGS / "quickstart-base.yaml"), output_dir=tmp_path / "base")
    base_losses = base.summary["train_loss_first"], base.summary["train_loss_final"]
    assert base_losses[1] < 0.7 < 5.0 < base_losses[0], base_losses  # it learned to count

    config = load_config(CONFIGS / "quickstart.yaml", [f"model.name_or_path={tmp_path / 'base' / 'model'}"])
    summary = train(config, output_dir=tmp_path / "lora").summary
    before, after = summary["eval_before"]["exact_match"], summary["eval_after"]["exact_match"]
    print(f"quickstart exact match: {before:.2%} -> {after:.2%}")
    assert summary["eval_before"]["exact_match_n"] == summary["eval_after"]["exact_match_n"] == 100
    assert before <= 0.05
    assert after >= 0.60
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] / 3
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()

    control = load_config(CONFIGS / "quickstart.yaml", ["model.name_or_path=builtin:tiny-llama", "eval.before_training=false"])
    untrained_base = train(control, output_dir=tmp_path / "control").summary["eval_after"]["exact_match"]
    print(f"same LoRA on the untrained base: {untrained_base:.2%}")
    assert untrained_base <= 0.30
