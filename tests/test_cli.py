"""CLI verbs that need no training: recipes, tiny-model, python -m."""

from __future__ import annotations

import logging
import subprocess
import sys

from conftest import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_writes_a_loadable_hf_folder(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "tiny-model", str(tmp_path / "tiny"), "--hidden-size", "64", "--num-layers", "2")
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "llama" and model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = "What is 12 plus 30? 42"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level BPE round-trips any text
    assert "é" == tokenizer.decode(tokenizer("é").input_ids)


def test_python_dash_m_runs_the_same_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "validate", str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"tunelab: error: config file {tmp_path / 'missing.yaml'} does not exist; check the path."
    assert "Traceback" not in done.stderr


def test_tiny_model_never_overwrites_an_existing_folder(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "tiny-model", str(tmp_path / "taken"))
    assert code == 2 and "already exists and is not an empty folder" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_checkout_kernels_folder_never_shadows_the_pypi_kernels_package():
    # transformers imports the PyPI "kernels" package when it is installed; run from the
    # checkout root, Python would find tunelab's kernels/ folder under that name first.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = "import tunelab, sys, transformers.modeling_utils; import tunelab.kernels; print(sys.modules.get('kernels'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    assert str(repo / "kernels") not in done.stdout


def test_every_package_is_listed_for_installation():
    """pyproject lists packages by name (recipes/ and kernels/ are mapped); a new subpackage that is
    not listed works in a checkout but is missing from a built wheel."""
    import tomllib

    from recipe_helpers import REPO

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tunelab").rglob("__init__.py")}
    on_disk |= {"tunelab.recipes", "tunelab.kernels"}
    assert on_disk == listed


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_nothing_else(caplog):
    import tunelab  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no hub here")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["something else"]
