"""tunelab run: teacher → synth → distil → eval in one file; unchanged stages are skipped on a rerun."""

from __future__ import annotations

import json

import yaml
from conftest import run_cli
from recipe_helpers import REPO


def pipeline_yaml(root, synth_seed: int = 0) -> str:
    data = str(REPO / "configs/data/quickstart")
    return yaml.safe_dump({
        "output_dir": str(root / "out"),
        "stages": [
            {"name": "teacher", "kind": "train", "config": str(REPO / "configs/tiny/full.yaml"),
             "overrides": ["training.max_steps=20", "eval.before_training=false", "eval.exact_match=false",
                           f"data.datasets=[{{path: {data}/train.jsonl, format: prompt_completion}}]",
                           f"data.eval_datasets=[{{path: {data}/eval.jsonl, format: prompt_completion, max_samples: 8}}]"]},
            {"name": "synth", "kind": "synth", "config": str(REPO / "configs/tiny/synth.yaml"),
             "overrides": ["teacher.path=${output_dir}/teacher", "seeds.max_samples=16", f"seed={synth_seed}",
                           f"seeds.path={data}/train.jsonl"]},
            {"name": "student", "kind": "train", "config": str(REPO / "configs/tiny/distill.yaml"),
             "overrides": ["recipe.teachers=[{path: ${output_dir}/teacher, dtype: float32}]",
                           "data.datasets=[{path: ${output_dir}/synth/data.jsonl, format: prompt_completion}]",
                           f"data.eval_datasets=[{{path: {data}/eval.jsonl, format: prompt_completion, max_samples: 8}}]",
                           "training.max_steps=3", "eval.exact_match=false"]},
            {"name": "eval", "kind": "eval", "model": "${output_dir}/student", "data": str(root / "eval.jsonl"),
             "max_samples": 8, "max_new_tokens": 4},
        ],
    })


def test_pipeline_runs_each_stage_once_and_reruns_only_what_changed(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_yaml(tmp_path))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text((REPO / "configs/data/quickstart/eval.jsonl").read_text())
    code, out, err = run_cli(capsys, "run", str(path))
    assert code == 0, err
    assert "tunelab: pipeline done: teacher ran, synth ran, student ran, eval ran" in out
    rows = (tmp_path / "out/synth/data.jsonl").read_text().splitlines()
    assert rows and json.loads(rows[0])["provenance"]["teacher"] == str(tmp_path / "out/teacher")
    assert json.loads((tmp_path / "out/eval/results.json").read_text())["examples"] == 8
    student = (tmp_path / "out/student/summary.json").stat().st_mtime_ns

    code, out, _ = run_cli(capsys, "run", str(path))
    assert code == 0 and "tunelab: pipeline done: teacher skipped, synth skipped, student skipped, eval skipped" in out
    assert (tmp_path / "out/student/summary.json").stat().st_mtime_ns == student

    # Another synth seed: the teacher is reused; synth and everything fed by it runs again.
    path.write_text(pipeline_yaml(tmp_path, synth_seed=1))
    code, out, _ = run_cli(capsys, "run", str(path))
    assert code == 0 and "tunelab: pipeline done: teacher skipped, synth ran, student ran, eval ran" in out

    # A file a stage reads that changes content under the same name counts as a change too.
    held_out.write_text(held_out.read_text().replace("442", "443", 1))
    code, out, _ = run_cli(capsys, "run", str(path))
    assert code == 0 and "tunelab: pipeline done: teacher skipped, synth skipped, student skipped, eval ran" in out


def test_pipeline_errors_are_one_sentence(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "stagez": []}))
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == 2 and 'unknown key "stagez" (did you mean "stages"?)' in err
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "stages": [{"name": "a", "kind": "train"}]}))
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == 2 and 'stage "a" (train) needs "config"' in err
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path),
                                    "stages": [{"name": "a", "kind": "train", "config": str(tmp_path / "none.yaml")}]}))
    code, _, err = run_cli(capsys, "run", str(path))
    assert code == 2 and err.strip() == f'tunelab: error: stage "a": config file {tmp_path / "none.yaml"} does not exist; check the path.'
    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err
