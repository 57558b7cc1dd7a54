"""Crash-safe checkpoints: exact resume after SIGKILL, clean stop on SIGTERM, NaN, changed configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli, write_config
from recipe_helpers import run_yaml
from safetensors.torch import load_file
from transformers import Trainer

from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.train.run import train
from tunelab.train.trainer import RecipeTrainer


def config_text(steps: int, save_steps: int) -> str:
    return run_yaml(max_steps=steps, save_steps=save_steps, save_total_limit=5)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def start(config, run_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config), "--output", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, process, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    config = write_config(tmp_path, config_text(steps=60, save_steps=10))
    reference = train(load_config(config), output_dir=tmp_path / "reference")

    process = start(config, tmp_path / "killed")
    wait_for(lambda: (tmp_path / "killed/checkpoints/checkpoint-10").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed/summary.json").exists()
    killed_at = max(losses(tmp_path / "killed"), default=0)
    assert 10 <= killed_at < 60, killed_at

    resumed = train(load_config(config), output_dir=tmp_path / "killed", resume=True)
    expected, got = losses(reference.run_dir), losses(resumed.run_dir)
    assert sorted(got) == list(range(1, 61))
    assert all(abs(got[step] - expected[step]) <= 1e-6 for step in expected), [
        (s, expected[s], got[s]) for s in expected if abs(got[s] - expected[s]) > 1e-6][:3]
    final = [load_file(run.run_dir / "adapter" / "adapter_model.safetensors") for run in (reference, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.allclose(final[0][k], final[1][k], rtol=0, atol=1e-6) for k in final[0])


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, capsys):
    config = write_config(tmp_path, config_text(steps=5000, save_steps=10000))
    process = start(config, tmp_path / "run")
    wait_for(lambda: (tmp_path / "run/metrics.jsonl").is_file() and (tmp_path / "run/metrics.jsonl").read_text(), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    checkpoint = tmp_path / f"run/checkpoints/checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert f"resume with: tunelab train {tmp_path / 'run' / 'config.yaml'} --output {tmp_path / 'run'} --resume" in err
    assert not (tmp_path / "run/summary.json").exists() and not (tmp_path / "run/adapter").exists()

    # Resuming with a different config is refused, naming the key.
    code, _, err = run_cli(capsys, "train", str(config), "--output", str(tmp_path / "run"), "--resume",
                           "training.learning_rate=0.5")
    assert code == 2 and "differs from the one" in err and "at training.learning_rate;" in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = write_config(tmp_path, config_text(steps=20, save_steps=2))
    real = RecipeTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(RecipeTrainer, "compute_loss", poisoned)
    with pytest.raises(UserError, match=r"the training loss became nan at step 6, so the run was stopped; "
                                        r"the last good checkpoint is .*checkpoint-4 \(--resume continues from it\)"):
        train(load_config(config), output_dir=tmp_path / "run")
    kept = load_file(tmp_path / "run/checkpoints/checkpoint-4/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (tmp_path / "run/checkpoints/checkpoint-6").exists()


def test_a_save_cut_short_never_looks_like_a_checkpoint(tmp_path, monkeypatch):
    config = write_config(tmp_path, config_text(steps=6, save_steps=2))
    real, calls = Trainer._save_rng_state, []

    def dies_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(load_config(config), output_dir=tmp_path / "run")
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".staging-checkpoint-4", "checkpoint-2"]
    monkeypatch.undo()
    resumed = train(load_config(config), output_dir=tmp_path / "run", resume=True)
    assert resumed.summary["steps"] == 6 and not (checkpoints / ".staging-checkpoint-4").exists()
