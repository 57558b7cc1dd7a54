"""Config loading: every error path gives one sentence naming the key/file and the fix, exit 2."""

from __future__ import annotations

import pytest
from conftest import run_cli, write_config

from tunelab.config import config_to_yaml, load_config, parse_config
from tunelab.errors import UserError


@pytest.fixture
def base_yaml(addition_jsonl, tiny_model_dir) -> str:
    return f"""
model:
  name_or_path: {tiny_model_dir}
recipe:
  name: lora
  r: 8
data:
  datasets:
    - path: {addition_jsonl}
      format: prompt_completion
  eval_ratio: 0.1
training:
  learning_rate: 2.0e-4
  max_steps: 5
"""


def validate(capsys, tmp_path, text: str, *overrides: str) -> tuple[int, str]:
    code, out, err = run_cli(capsys, "validate", str(write_config(tmp_path, text)), *overrides)
    return code, out + err


def test_valid_config_passes(capsys, tmp_path, base_yaml):
    code, output = validate(capsys, tmp_path, base_yaml)
    assert code == 0
    assert "OK (recipe lora" in output


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("training:", "trainig:"), 'unknown key "trainig" (did you mean "training"?); remove it or fix its spelling.'),
        (("  learning_rate:", "  learnig_rate:"), 'unknown key "training.learnig_rate" (did you mean "learning_rate"?)'),
        (("  r: 8", "  rank: 8"), 'unknown key "recipe.rank"'),
        (("  r: 8", "  r: 0"), '"recipe.r": input should be greater than or equal to 1, got 0.'),
        (("  r: 8", "  r: eight"), '"recipe.r": input should be a valid integer'),
        (("  max_steps: 5", "  max_steps: -3"), '"training.max_steps": input should be greater than or equal to 1, got -3.'),
        (("learning_rate: 2.0e-4", "learning_rate: fast"), '"training.learning_rate": input should be a valid number'),
        (("format: prompt_completion", "format: chat"), '"data.datasets[0].format": input should be'),
        (("name: lora", "name: lorra"), 'recipe.name "lorra" is not a recipe (did you mean "lora"?)'),
        (("eval_ratio: 0.1", "eval_ratio: 1.5"), '"data.eval_ratio": input should be less than 1'),
    ],
)
def test_schema_errors_name_the_key(capsys, tmp_path, base_yaml, edit, expected):
    code, output = validate(capsys, tmp_path, base_yaml.replace(*edit))
    assert code == 2
    assert expected in output
    assert "Traceback" not in output


def test_contradictory_options(capsys, tmp_path, base_yaml):
    text = base_yaml.replace("  max_steps: 5", "  max_steps: 5\n  warmup_steps: 3\n  warmup_ratio: 0.1")
    code, output = validate(capsys, tmp_path, text)
    assert code == 2
    assert "training.warmup_steps and training.warmup_ratio are both set; keep one of them." in output


def test_eval_sources_conflict(capsys, tmp_path, base_yaml, addition_jsonl):
    text = base_yaml.replace("  eval_ratio: 0.1", f"  eval_ratio: 0.1\n  eval_datasets: [{{path: {addition_jsonl}, format: prompt_completion}}]")
    code, output = validate(capsys, tmp_path, text)
    assert code == 2
    assert "data.eval_datasets and data.eval_ratio are both set" in output


def test_missing_required_keys(capsys, tmp_path):
    code, output = validate(capsys, tmp_path, "recipe: lora\n")
    assert code == 2
    assert 'missing required key "model"; add it to the config.' in output
    assert 'missing required key "data"; add it to the config.' in output


def test_missing_recipe(capsys, tmp_path, base_yaml):
    text = base_yaml.replace("recipe:\n  name: lora\n  r: 8\n", "")
    code, output = validate(capsys, tmp_path, text)
    assert code == 2
    assert 'missing required key "recipe"' in output


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert f"config file {tmp_path / 'nope.yaml'} does not exist; check the path." in err


def test_invalid_yaml_names_the_line(capsys, tmp_path):
    code, output = validate(capsys, tmp_path, "model:\n  name_or_path: x\nrecipe: [lora\n")
    assert code == 2
    assert "is not valid YAML at line" in output


def test_top_level_must_be_mapping(capsys, tmp_path):
    code, output = validate(capsys, tmp_path, "- just\n- a list\n")
    assert code == 2
    assert "must be a mapping of keys at the top level" in output


def test_missing_data_file(capsys, tmp_path, base_yaml, addition_jsonl):
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(addition_jsonl), str(tmp_path / "gone.jsonl")))
    assert code == 2
    assert f'data.datasets[0].path "{tmp_path / "gone.jsonl"}" does not exist; check the path.' in output


def test_missing_model_folder(capsys, tmp_path, base_yaml, tiny_model_dir):
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(tiny_model_dir), str(tmp_path / "no-model")))
    assert code == 2
    assert "does not exist; check the path" in output and "model.name_or_path" in output


def test_unknown_builtin_model(capsys, tmp_path, base_yaml, tiny_model_dir):
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(tiny_model_dir), "builtin:tiny-lama"))
    assert code == 2
    assert 'is not a built-in model (did you mean "tiny-llama"?)' in output


def test_hub_ids_pass_validation_without_network(capsys, tmp_path, base_yaml, tiny_model_dir):
    code, _ = validate(capsys, tmp_path, base_yaml.replace(str(tiny_model_dir), "meta-llama/Llama-3.1-8B"))
    assert code == 0


def test_overrides_apply_and_are_validated(capsys, tmp_path, base_yaml):
    path = write_config(tmp_path, base_yaml)
    config = load_config(path, ["training.learning_rate=1e-3", "recipe.r=4"])
    assert config.training.learning_rate == 1e-3
    assert config.recipe.r == 4
    code, _, err = run_cli(capsys, "validate", str(path), "training.micro_batch_size=0")
    assert code == 2
    assert '"training.micro_batch_size": input should be greater than or equal to 1, got 0.' in err
    code, _, err = run_cli(capsys, "validate", str(path), "training.learning_rate")
    assert code == 2
    assert 'override "training.learning_rate" is not of the form key=value' in err


def test_interpolation(tmp_path, base_yaml):
    text = base_yaml + "output_dir: runs/${recipe.name}-r${recipe.r}\n"
    assert load_config(write_config(tmp_path, text)).output_dir == "runs/lora-r8"
    with pytest.raises(UserError, match="could not be resolved"):
        load_config(write_config(tmp_path, base_yaml + "output_dir: ${nowhere.key}\n"))


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", str(tmp_path / "nope.yaml"), "--debug")
    assert code == 2
    assert "Traceback" in err and "does not exist" in err


def test_resolved_config_round_trips(tmp_path, base_yaml):
    config = load_config(write_config(tmp_path, base_yaml))
    again = parse_config(__import__("yaml").safe_load(config_to_yaml(config)))
    assert again == config
    assert again.recipe.alpha == 16.0  # defaults are written out, not left implicit


def test_scalar_and_undecodable_documents(capsys, tmp_path):
    code, output = validate(capsys, tmp_path, "true\n")
    assert code == 2 and "must be a mapping of keys at the top level" in output
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code == 2 and f"config file {path} could not be read" in err


def test_model_folder_without_config_json(capsys, tmp_path, base_yaml, tiny_model_dir):
    (tmp_path / "empty-model").mkdir()
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(tiny_model_dir), str(tmp_path / "empty-model")))
    assert code == 2
    assert "is a local path without a config.json; point it at a Hugging Face model folder." in output


def test_unknown_user_home_is_a_clear_error(capsys, tmp_path, base_yaml, tiny_model_dir):
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(tiny_model_dir), "~nosuchuser/model"))
    assert code == 2
    assert 'model.name_or_path "~nosuchuser/model" does not exist; check the path' in output


@pytest.mark.parametrize(
    ("files", "pattern", "expected"),
    [
        ([], "folder", "matches no data file"),
        (["a.xml"], "folder", "matches no data file"),
        (["a.jsonl", "b.csv"], "folder", "mixes file types .csv, .jsonl; give each type its own source."),
        (["a.jsonl"], "*.csv", "matches no data file"),
    ],
)
def test_data_folder_and_glob_errors(capsys, tmp_path, base_yaml, addition_jsonl, files, pattern, expected):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}\n")
    target = folder if pattern == "folder" else folder / pattern
    code, output = validate(capsys, tmp_path, base_yaml.replace(str(addition_jsonl), str(target)))
    assert code == 2
    assert f'data.datasets[0].path "{target}"' in output and expected in output


def test_bad_regex_and_unknown_chat_template(capsys, tmp_path, base_yaml):
    code, output = validate(capsys, tmp_path, base_yaml, "recipe.target_modules=(")
    assert code == 2
    assert "\"recipe.target_modules\": '(' is neither 'all-linear' nor a valid regex" in output
    code, output = validate(capsys, tmp_path, base_yaml, "data.chat_template=chatm")
    assert code == 2
    assert "\"data.chat_template\": input should be 'chatml', 'llama-3' or 'alpaca', got 'chatm'." in output


def test_every_error_line_is_prefixed(capsys, tmp_path):
    code, _, err = run_cli(capsys, "validate", str(write_config(tmp_path, "recipe: lora\n")))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("tunelab: error: ") for line in lines)
