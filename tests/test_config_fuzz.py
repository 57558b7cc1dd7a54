"""Property test: random YAML and random overrides never produce a traceback.

``tunelab validate`` must answer 0 (valid) or 2 (one clear message) for any input.
"""

from __future__ import annotations

import yaml
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEYS = [
    "model", "name_or_path", "dtype", "recipe", "name", "r", "alpha", "target_modules", "data", "datasets",
    "path", "format", "eval_ratio", "max_length", "training", "learning_rate", "max_steps", "micro_batch_size",
    "warmup_steps", "warmup_ratio", "eval", "output_dir", "lora", "full", "text", "x", "",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["lora", "full", "builtin:tiny-llama", "auto", "text", "prompt_completion", "${model.name_or_path}", "${oc.env:NOPE}", "1e-4", "all-linear", "~nouser/model", "./missing/model", "data/*.jsonl", "(", "[q_proj]"]),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
override_items = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["training.learning_rate", "recipe.r", "recipe", "data.datasets", "model", "a.b.c", "recipe.name"]), st.text(max_size=10)),
    st.text(max_size=15).filter(lambda s: not s.startswith("-")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents, overrides=st.lists(override_items, max_size=3))
def test_random_yaml_never_tracebacks(capsys, tmp_path, document, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    code, _, err = run_cli(capsys, "validate", str(path), *overrides)
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("tunelab: error: ") and err.strip().endswith(".")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_traceback(capsys, tmp_path, raw):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code in (0, 2)
    assert "Traceback" not in err


VALID = {
    "model": {"name_or_path": "meta-llama/Llama-3.2-1B", "dtype": "auto"},
    "recipe": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "data": {"datasets": [{"path": "tatsu-lab/alpaca", "format": "alpaca"}], "eval_ratio": 0.1, "max_length": 256},
    "training": {"learning_rate": 2e-4, "max_steps": 10, "warmup_steps": 2, "micro_batch_size": 2},
    "eval": {"max_samples": 10},
}
SECTION_PATHS = [("model",), ("recipe",), ("data",), ("data", "datasets", 0), ("training",), ("eval",), ()]


def _edit(document: dict, section: tuple, key: str, value) -> dict:
    """Set (or delete) ``key`` under ``section``; an edit whose section an earlier edit removed is skipped."""
    import copy

    edited = copy.deepcopy(document)
    node = edited
    for part in section:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return edited
    if not isinstance(node, dict):
        return edited
    if value == "<delete>":
        node.pop(key, None)
    else:
        node[key] = value
    return edited


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(SECTION_PATHS), keys, st.one_of(scalars, st.just("<delete>"), st.dictionaries(keys, scalars, max_size=2))),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_valid_config_never_tracebacks(capsys, tmp_path, edits):
    document = VALID
    for section, key, value in edits:
        document = _edit(document, section, key, value)
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    code, _, err = run_cli(capsys, "validate", str(path))
    assert code in (0, 2)
    assert "Traceback" not in err
