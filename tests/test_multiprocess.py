"""Two CPU processes (DDP over gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import write_config
from recipe_helpers import probe_logits, run_yaml

from tunelab.models.trained import load_trained

CONFIG = run_yaml(max_steps=6, save_steps=3)


def run(config, out, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), "--output", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    config = write_config(tmp_path, CONFIG)
    single = run(config, tmp_path / "one")
    double = run(config, tmp_path / "two", "--nproc", "2", "training.micro_batch_size=4")
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-3000:]
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    # Only the main process writes: one record per step, one "run saved" line.
    assert [r["step"] for r in records["two"]] == [1, 2, 3, 4, 5, 6]
    assert double.stdout.count("tunelab: run saved to") == 1
    for a, b in zip(records["one"], records["two"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # The saved adapter is complete: it reloads and matches the single-process one.
    one, two = (probe_logits(load_trained(tmp_path / name)[0]) for name in ("one", "two"))
    assert torch.allclose(one, two, rtol=0, atol=1e-4)
