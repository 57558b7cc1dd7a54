"""Two CPU processes (gloo) train exactly like one process with the same global batch: DDP, FSDP2, ZeRO-2/3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import run_cli, write_config
from recipe_helpers import REPO, probe_logits, run_yaml

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


# --- sharded strategies: FSDP2 and DeepSpeed ZeRO on 2 CPU processes (gloo) ---------------------------------

SHARDED_CASES = {
    # name: (recipe, launcher, strategy overrides)
    "fsdp-lora": ("lora", "accelerate", ["distributed.strategy=fsdp"]),
    "fsdp-qlora": ("qlora", "tunelab", ["distributed.strategy=fsdp"]),
    "zero2-lora": ("lora", "tunelab", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]),
    "zero3-full": ("full", "torchrun", ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3"]),
}


def recipe_yaml(recipe: str) -> str:
    config = yaml.safe_load(run_yaml(recipe, max_steps=4, save_steps=2))
    if recipe == "full":
        config["recipe"] = {"name": "full"}
    return yaml.safe_dump(config)


def launch(launcher: str, config, out, overrides: list[str]) -> subprocess.CompletedProcess:
    """Two training processes started the way a user would with ``launcher``."""
    train_args = ["train", str(config), "--output", str(out), *overrides]
    commands = {
        "tunelab": [sys.executable, "-m", "tunelab", *train_args, "--nproc", "2"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "-m", "tunelab", *train_args],
        # --multi_gpu is accelerate's name for its multi-process (torchrun) launcher; it runs on CPUs too.
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                       "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "tunelab", *train_args],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(commands[launcher], capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory) -> dict[str, object]:
    """One-process reference runs (micro-batch 8) of each recipe the sharded cases use."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for recipe in sorted({case[0] for case in SHARDED_CASES.values()}):
        config = write_config(root, recipe_yaml(recipe), f"{recipe}.yaml")
        result = run(config, root / recipe)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[recipe] = root / recipe
    return runs


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_sharded_strategy_matches_one_process(case, tmp_path, single_process_runs):
    recipe, launcher, overrides = SHARDED_CASES[case]
    config = write_config(tmp_path, recipe_yaml(recipe))
    result = launch(launcher, config, tmp_path / "two", [*overrides, "training.micro_batch_size=4"])
    assert result.returncode == 0, result.stderr[-4000:]
    strategy = "FSDP2" if "fsdp" in case else f"DeepSpeed ZeRO-{case[4]}"
    assert "2 processes" in result.stdout and strategy in result.stdout, result.stdout[-2000:]
    assert result.stdout.count("tunelab: run saved to") == 1  # only the main process writes

    # The same global batch gives the same losses at every step (tolerance: gloo's reduction order).
    one, two = metrics(single_process_runs[recipe]), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])

    # Checkpoints hold the strategy's shards: FSDP's distributed checkpoint or DeepSpeed's per-rank files.
    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-4"
    shard_files = [p.name for p in checkpoint.rglob("*") if p.is_file()]
    if "fsdp" in case:
        assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    else:
        assert any("zero_pp_rank_1" in name for name in shard_files), shard_files
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2

    # The artifact holds the full weights gathered from the shards and loads without tunelab:
    # plain transformers for a full model, plain PEFT on the base for an adapter.
    if recipe == "full":
        from transformers import AutoModelForCausalLM

        gathered = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
        reference = AutoModelForCausalLM.from_pretrained(single_process_runs[recipe] / "model")
        assert gathered.state_dict().keys() == reference.state_dict().keys()
    else:
        from peft import PeftModel

        from tunelab.models.trained import load_run_base

        gathered = PeftModel.from_pretrained(load_run_base(tmp_path / "two"), tmp_path / "two" / "adapter")
        reference = load_trained(single_process_runs[recipe])[0]
    assert torch.allclose(probe_logits(gathered), probe_logits(reference), rtol=0, atol=1e-4)


@pytest.mark.slow  # two more 2-process runs (about a minute); make test-slow
def test_sharded_run_resumes_exactly(tmp_path, single_process_runs):
    """A ZeRO-2 run that lost everything after its step-2 checkpoint resumes to the uninterrupted losses."""
    config = write_config(tmp_path, recipe_yaml("lora"))
    overrides = ["distributed.strategy=deepspeed", "training.micro_batch_size=4"]
    run_dir = tmp_path / "run"
    first = launch("tunelab", config, run_dir, overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    # What a crash right after the step-2 checkpoint leaves behind.
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink()
    (run_dir / "metrics.jsonl").write_text("".join((run_dir / "metrics.jsonl").read_text().splitlines(True)[:2]))

    resumed = launch("tunelab", config, run_dir, [*overrides, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two = metrics(single_process_runs["lora"]), metrics(run_dir)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


TINY = {"model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"datasets": [{"path": "configs/data/quickstart/train.jsonl", "format": "prompt_completion"}]}}


@pytest.mark.parametrize(("recipe", "distributed", "message"), [
    ("lora", {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2, "offload_params": True}},
     "distributed.deepspeed.offload_params needs zero_stage 3"),
    ("prefix", {"strategy": "fsdp"}, 'recipe "prefix" does not train under distributed.strategy "fsdp"'),
    ("lora", {"strategy": "fdsp"}, "\"distributed.strategy\": input should be 'ddp', 'fsdp' or 'deepspeed', got 'fdsp'"),
])
def test_impossible_strategies_are_refused_by_validate(recipe, distributed, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = write_config(tmp_path, yaml.safe_dump({**TINY, "recipe": {"name": recipe}, "distributed": distributed}))
    code, _, err = run_cli(capsys, "validate", str(config))
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_fsdp_with_one_process_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = write_config(tmp_path, yaml.safe_dump({**TINY, "recipe": {"name": "lora"}, "distributed": {"strategy": "fsdp"}}))
    code, _, err = run_cli(capsys, "train", str(config), "--output", str(tmp_path / "run"))
    assert code == 2 and "shards the model across processes but this run has one; start it with --nproc N" in err
    assert not (tmp_path / "run").exists()


def test_missing_deepspeed_is_named_with_the_install_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    monkeypatch.chdir(REPO)
    config = write_config(tmp_path, yaml.safe_dump({**TINY, "recipe": {"name": "lora"}, "distributed": {"strategy": "deepspeed"}}))
    code, _, err = run_cli(capsys, "validate", str(config))
    assert code == 2 and 'DeepSpeed is not installed; pip install "tunelab[deepspeed]"' in err, err


@pytest.mark.slow  # two 2-process launches (about 50 s); make test-slow
def test_a_signal_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path):
    """SIGTERM to the launcher (what a job scheduler sends): the processes agree on the step to stop
    after, save one checkpoint together, say once how to resume, and the resumed run finishes."""
    import signal
    import time

    config = write_config(tmp_path, run_yaml(max_steps=400, save_steps=1000))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tunelab", "train", str(config), "--output", str(tmp_path / "run"),
               "--nproc", "2", "training.micro_batch_size=4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=tmp_path, start_new_session=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)

    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("tunelab: stopped by SIGTERM after step") == 1
    step = int(err.split("tunelab: stopped by SIGTERM after step ")[1].split(";")[0])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"checkpoint-{step}"]
    assert "--resume --nproc 2" in err
    assert len(log.read_text().splitlines()) == step

    resumed = subprocess.run([*command, "--resume", "--max-steps", str(step + 2), "--allow-config-change"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, step + 3))
