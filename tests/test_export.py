"""Merge, export, eval and generate: artifacts that load anywhere, with logits that match the trained model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from recipe_helpers import probe_logits, train_tiny
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tunelab.export.gguf_export import gguf_name, rotary_permute
from tunelab.export.merge import merge_run
from tunelab.models.trained import load_trained


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export-runs")


def merged_logits(folder) -> torch.Tensor:
    return probe_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "adalora", "bitfit", "full"])
def test_merged_model_equals_the_trained_model(name, runs_dir, tmp_path):
    run = train_tiny(name, runs_dir)
    report = merge_run(run.run_dir, tmp_path / "merged", max_shard_bytes=400_000)
    assert report["shards"] > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    expected = probe_logits(load_trained(run.run_dir)[0])
    assert torch.allclose(merged_logits(tmp_path / "merged"), expected, rtol=0, atol=1e-5)
    for file in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / file).is_file(), file
    if name == "bitfit":
        config = json.loads((tmp_path / "merged" / "config.json").read_text())
        assert config["attention_bias"] and config["mlp_bias"]


def test_merged_folder_loads_without_tunelab_or_peft(runs_dir, tmp_path):
    run = train_tiny("lora", runs_dir)
    merge_run(run.run_dir, tmp_path / "merged")
    script = f"""
import sys
sys.modules["peft"] = None; sys.modules["tunelab"] = None  # importing either now fails
import torch
from transformers import AutoModelForCausalLM
ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}, dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, {str(tmp_path / 'logits.pt')!r})
"""
    # Run outside the checkout, as a serving machine would (its kernels/ folder is tunelab's).
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = probe_logits(load_trained(run.run_dir)[0])
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)


def test_qlora_merges_into_the_dequantized_base_by_default_because_it_is_closer(runs_dir, tmp_path):
    run = train_tiny("qlora", runs_dir)
    trained = probe_logits(load_trained(run.run_dir)[0])
    merge_run(run.run_dir, tmp_path / "dequantized")
    merge_run(run.run_dir, tmp_path / "original", qlora_base="original")
    error = {name: float((merged_logits(tmp_path / name) - trained).abs().max()) for name in ("dequantized", "original")}
    assert error["dequantized"] < 1e-5 < error["original"], error
    dtypes = {t.dtype for t in AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").state_dict().values()}
    assert dtypes == {torch.float32}  # never 4-bit


def test_merge_buffers_at_most_one_shard(runs_dir, tmp_path):
    # The weights pass through one tensor at a time; what accumulates is the output shard,
    # capped here 8x below the model. (The slow test caps the whole process's memory.)
    run = train_tiny("lora", runs_dir)
    cap = 300_000
    report = merge_run(run.run_dir, tmp_path / "merged", max_shard_bytes=cap)
    assert report["bytes"] > 8 * cap
    assert 0 < report["peak_buffer_bytes"] <= cap


@pytest.mark.parametrize("name", ["prefix", "ptuning", "gatera"])
def test_unmergeable_recipes_are_refused_in_one_sentence(name, runs_dir, tmp_path, capsys):
    run = train_tiny(name, runs_dir)
    code, _, err = run_cli(capsys, "merge", str(run.run_dir), "--output", str(tmp_path / "out"))
    assert code == 2 and f'trained with recipe "{name}"' in err and "serve the adapter" in err
    assert not (tmp_path / "out").exists()


def test_merge_bad_inputs(runs_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", str(tmp_path), "--output", str(tmp_path / "out"))
    assert code == 2 and "is not a tunelab run directory" in err
    run = train_tiny("lora", runs_dir)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.yaml").write_text((run.run_dir / "config.yaml").read_text())
    code, _, err = run_cli(capsys, "merge", str(incomplete), "--output", str(tmp_path / "out"))
    assert code == 2 and "has no adapter/ folder: the run did not finish" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_export_reads_back_with_the_merged_weights(quant, runs_dir, tmp_path, capsys):
    import gguf

    run = train_tiny("lora", runs_dir)
    code, _, err = run_cli(capsys, "export", str(run.run_dir), "--format", "gguf", "--output", str(tmp_path / "m.gguf"),
                           "--quant", quant)
    assert code == 0, err
    merge_run(run.run_dir, tmp_path / "merged")
    weights = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 512
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(n) for n in weights}
    for name, value in weights.items():
        if ".q_proj." in name:
            value = rotary_permute(value, 4)
        elif ".k_proj." in name:
            value = rotary_permute(value, 2)
        tensor = tensors[gguf_name(name)]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(value.shape)
        tolerance = 1e-3 if quant == "f16" or value.ndim == 1 else 2e-2
        np.testing.assert_allclose(data, value.numpy(), atol=tolerance * float(value.abs().max()), err_msg=name)


def test_gguf_refuses_unsupported_architectures(tmp_path, capsys):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "qwen2"), "--format", "gguf", "--output", str(tmp_path / "q.gguf"))
    assert code == 2 and "exporting Qwen2ForCausalLM to GGUF is not supported" in err
    assert not list(tmp_path.glob("*.gguf*"))


def test_peft_export_loads_with_plain_peft(runs_dir, tmp_path, capsys, tiny_model_dir):
    from peft import PeftModel

    run = train_tiny("lora", runs_dir)
    code, _, _ = run_cli(capsys, "export", str(run.run_dir), "--format", "peft", "--output", str(tmp_path / "adapter"))
    assert code == 0
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(saved["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(probe_logits(model), probe_logits(load_trained(run.run_dir)[0]), rtol=0, atol=1e-6)
    gated = train_tiny("gatera", runs_dir)
    code, _, err = run_cli(capsys, "export", str(gated.run_dir), "--format", "peft", "--output", str(tmp_path / "g"))
    assert code == 2 and 'recipe "gatera" does not produce a PEFT adapter' in err


def test_eval_puts_base_and_fine_tuned_side_by_side(runs_dir, tmp_path, capsys):
    run = train_tiny("full", runs_dir)
    data = "configs/data/quickstart/eval.jsonl"
    from recipe_helpers import REPO

    code, out, err = run_cli(capsys, "eval", str(run.run_dir), "--data", str(REPO / data), "--max-samples", "20",
                             "--max-new-tokens", "5", "--json", str(tmp_path / "eval.json"))
    assert code == 0, err
    assert "| metric | base | fine-tuned |" in out and "| exact_match |" in out and "| contains |" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["examples"] == 20 and result["model"]["loss"] < result["base"]["loss"]


@pytest.mark.parametrize("name", ["qlora", "prefix"])
def test_generate_streams_from_an_adapter_run_and_from_a_merged_folder(name, runs_dir, tmp_path, capsys):
    from tunelab.eval.generate import Session, chat

    run = train_tiny(name, runs_dir)
    code, out, err = run_cli(capsys, "generate", str(run.run_dir), "--prompt", "What comes next after 5,6,7?",
                             "--max-new-tokens", "4")
    assert code == 0, err
    session = Session(str(run.run_dir), max_new_tokens=4)
    expected = session.reply("What comes next after 5,6,7?", sys.stderr)
    assert out.strip() == expected and expected
    if name == "qlora":
        merge_run(run.run_dir, tmp_path / "merged")
        merged = Session(str(tmp_path / "merged"), max_new_tokens=4)
        assert merged.reply("What comes next after 5,6,7?", sys.stderr) == expected
        import io

        stream = io.StringIO()
        chat(merged, ["What comes next after 5,6,7?", "/reset", "/exit", "never read"], stream)
        assert stream.getvalue().count("assistant> ") == 1 and expected in stream.getvalue()
