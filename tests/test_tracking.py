"""Tracking: W&B (offline without credentials) and TensorBoard receive every step's metrics and the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config
from recipe_helpers import run_yaml

from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.train.run import train

CONFIG = run_yaml("gatera", max_steps=4)


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_ENTITY", "WANDB_NOTES", "WANDB_TAGS",
                "WANDB_SILENT", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(key, "unset")  # registers the original value for restoring
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials


def wandb_records(path: Path):
    """Records of a W&B run file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_every_step_and_the_config(clean_wandb_env, tmp_path, capsys):
    config = write_config(tmp_path, CONFIG + "\ntracking: {wandb: {project: tunelab-test, tags: [tiny, ci], notes: hello}}\n")
    result = train(load_config(config), output_dir=tmp_path / "run")
    assert "W&B: no credentials found, logging offline to" in capsys.readouterr().out
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config_updates, run = [], {}, None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config_updates.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            run = record.run
    assert run.project == "tunelab-test" and list(run.tags) == ["tiny", "ci"] and run.notes == "hello"
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "train/loss" in h]
    assert [h["train/loss"] for h in steps] == pytest.approx([r["loss"] for r in logged])
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/peak_rss_mb", "train/gate_mean"):
        assert all(key in h for h in steps), key
    assert config_updates["tunelab"]["recipe"]["name"] == "gatera"
    assert config_updates["tunelab"]["training"]["max_steps"] == 4


def test_tensorboard_gets_the_same_scalars(clean_wandb_env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_config(tmp_path, CONFIG + "\ntracking: {tensorboard: true}\n")
    result = train(load_config(config), output_dir=tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    logged = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged, rel=1e-6)
    assert {"train/tokens_per_s", "train/peak_rss_mb", "train/gate_entropy_loss"} <= set(events.Tags()["scalars"])


def test_missing_tracking_package_is_a_clear_error(clean_wandb_env, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    config = write_config(tmp_path, CONFIG + "\ntracking: {wandb: {project: x}}\n")
    with pytest.raises(UserError, match=r'tracking.wandb needs the wandb package.*pip install "tunelab\[tracking\]"'):
        train(load_config(config), output_dir=tmp_path / "run")
