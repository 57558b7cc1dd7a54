"""Trainer core on the built-in tiny model: pinned losses, run directory contract, adapter reload."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import run_cli, write_config
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tunelab.config import load_config, parse_config
from tunelab.train.run import train

# LoRA r=8 on builtin:tiny-llama, seed 42, 6 steps of 8 examples, lr 1e-3 (fp32, 1 CPU thread).
GOLDEN_LORA_LOSSES = [6.178014, 6.133035, 5.897214, 5.833571, 5.642049, 5.495594]


def lora_yaml(data_path, out_dir, extra: str = "") -> str:
    return f"""
model: {{name_or_path: "builtin:tiny-llama", dtype: float32}}
recipe: {{name: lora, r: 8, alpha: 16}}
data:
  datasets: [{{path: {data_path}, format: prompt_completion}}]
  eval_ratio: 0.1
  max_length: 64
training: {{max_steps: 6, micro_batch_size: 8, learning_rate: 1.0e-3, lr_scheduler: constant, seed: 42}}
eval: {{max_samples: 8, max_new_tokens: 4}}
output_dir: {out_dir}
{extra}"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, addition_jsonl, tunelab_cache):
    tmp = tmp_path_factory.mktemp("lora-run")
    config = load_config(write_config(tmp, lora_yaml(addition_jsonl, tmp / "run")))
    return train(config)


def logged_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_golden_lora_losses(lora_run):
    losses = logged_losses(lora_run.run_dir)
    assert losses == pytest.approx(GOLDEN_LORA_LOSSES, abs=1e-4), [round(x, 6) for x in losses]


def test_run_directory_contract(lora_run):
    run_dir = lora_run.run_dir
    saved = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.recipe.r == 8 and saved.training.max_steps == 6
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= r.keys() and r["tokens_per_s"] > 0 for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == lora_run.summary
    assert summary["steps"] == 6
    assert summary["train_loss_final"] == records[-1]["loss"]
    assert summary["eval_before"]["exact_match_n"] == 8 and summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["peak_memory_mb"]["rss"] > 0 and summary["wall_time_s"] > 0 and summary["tokens_per_s"] > 0
    # LoRA r=8 on the 7 linear layers of each of the 2 blocks: r * (in + out) each
    # (hidden 128, MLP 512, 2 KV heads of 32 -> k/v out 64).
    hidden, inter, kv = 128, 512, 64
    per_block = 8 * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 2 + (inter + hidden))
    assert summary["trainable_parameters"] == 2 * per_block
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    assert "<|im_start|>" in (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-6"]


def test_adapter_reloads_with_plain_peft(lora_run, tiny_model_dir):
    input_ids = torch.randint(0, 400, (3, 17), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        untrained = base(input_ids=input_ids).logits
        reloaded = PeftModel.from_pretrained(base, lora_run.run_dir / "adapter").eval()
        actual = reloaded(input_ids=input_ids).logits
        expected = lora_run.model.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (untrained - expected).abs().max() > 1e-2  # the adapter really changed the model


def test_full_recipe_trains_and_saves_model(tmp_path, addition_jsonl):
    text = lora_yaml(addition_jsonl, tmp_path / "run").replace("{name: lora, r: 8, alpha: 16}", "full")
    result = train(load_config(write_config(tmp_path, text)), max_steps=3)
    losses = logged_losses(result.run_dir)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.summary["trainable_parameters"] == result.summary["total_parameters"]
    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir / "model", dtype=torch.float32).eval()
    input_ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, result.model.eval()(input_ids=input_ids).logits)


def test_target_modules_matching_nothing_is_an_error(capsys, tmp_path, addition_jsonl):
    text = lora_yaml(addition_jsonl, tmp_path / "run").replace("alpha: 16}", "alpha: 16, target_modules: [nonexistent_proj]}")
    code, _, err = run_cli(capsys, "train", str(write_config(tmp_path, text)))
    assert code == 2
    assert "recipe.target_modules ['nonexistent_proj'] matched no module" in err


def test_existing_run_directory_is_not_overwritten(capsys, tmp_path, addition_jsonl):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    path = write_config(tmp_path, lora_yaml(addition_jsonl, tmp_path / "run"))
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    code, _, err = run_cli(capsys, "train", str(path), "--resume")
    assert code == 2 and "holds no checkpoint; drop --resume" in err


def test_cli_max_steps_and_output_flags(capsys, tmp_path, addition_jsonl):
    path = write_config(tmp_path, lora_yaml(addition_jsonl, tmp_path / "ignored"))
    code, out, _ = run_cli(capsys, "train", str(path), "--output", str(tmp_path / "chosen"), "--max-steps", "2", "recipe.r=4")
    assert code == 0, out
    assert len(logged_losses(tmp_path / "chosen")) == 2
    assert not (tmp_path / "ignored").exists()
    assert yaml.safe_load((tmp_path / "chosen" / "config.yaml").read_text())["recipe"]["r"] == 4


def test_resume_continues_from_the_last_checkpoint(capsys, tmp_path, addition_jsonl):
    path = write_config(tmp_path, lora_yaml(addition_jsonl, tmp_path / "run", extra=""))
    code, _, err = run_cli(capsys, "train", str(path), "--max-steps", "3", "training.save_steps=3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", str(path), "--resume", "training.save_steps=3")
    assert code == 0, err
    losses = logged_losses(tmp_path / "run")
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert losses[3] < losses[0]


def test_max_steps_caps_an_epoch_run_and_is_saved(capsys, tmp_path, addition_jsonl):
    # 180 train rows / micro-batch 8 = 23 steps per epoch; --max-steps only ever lowers that.
    text = lora_yaml(addition_jsonl, tmp_path / "run").replace("max_steps: 6, ", "num_epochs: 1, ")
    path = write_config(tmp_path, text)
    code, _, err = run_cli(capsys, "train", str(path), "--max-steps", "1000", "--output", str(tmp_path / "a"), "eval.before_training=false")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["steps"] == 23
    code, _, err = run_cli(capsys, "train", str(path), "--max-steps", "2", "--output", str(tmp_path / "b"), "eval.before_training=false")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["output_dir"] == str(tmp_path / "b")


def test_overwrite_replaces_a_finished_run_and_failed_runs_do_not_block(capsys, tmp_path, addition_jsonl):
    path = write_config(tmp_path, lora_yaml(addition_jsonl, tmp_path / "run"))
    assert run_cli(capsys, "train", str(path), "--max-steps", "1")[0] == 0
    code, _, err = run_cli(capsys, "train", str(path), "--max-steps", "2", "--overwrite")
    assert code == 0, err
    assert len(logged_losses(tmp_path / "run")) == 2
    # A run that fails before its first checkpoint leaves nothing that blocks the next attempt.
    code, _, err = run_cli(capsys, "train", str(path), "--output", str(tmp_path / "failed"), "recipe.target_modules=[nope]")
    assert code == 2 and "matched no module" in err
    assert run_cli(capsys, "train", str(path), "--output", str(tmp_path / "failed"), "--max-steps", "1")[0] == 0


def test_output_that_is_a_file_is_refused(capsys, tmp_path, addition_jsonl):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "train", str(write_config(tmp_path, lora_yaml(addition_jsonl, tmp_path / "file"))))
    assert code == 2 and "is a file; choose another --output" in err


def test_dtype_auto_is_fp32_on_a_cpu_and_bf16_cpus_get_a_hint(monkeypatch):
    """auto never depends on which CPU runs the tests; where bf16 would be faster, one line says so."""
    import tunelab.models.load as load
    from tunelab.config.schema import ModelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(load, "cpu_has_bf16_matmul", lambda: True)
    hint = load.dtype_hint(ModelConfig(name_or_path="builtin:tiny-llama"))
    assert hint and "model.dtype: bfloat16" in hint
    assert load.dtype_hint(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32")) is None
    monkeypatch.setattr(load, "cpu_has_bf16_matmul", lambda: False)
    assert load.dtype_hint(ModelConfig(name_or_path="builtin:tiny-llama")) is None
