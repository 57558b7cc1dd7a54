"""What each method must do beyond training: scaling, targeting, quantization, magnitudes, prompts, biases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli, write_config
from peft.tuners.lora import LoraLayer
from recipe_helpers import LAYERS, LINEARS, REPO, build, probe_logits, tiny_config, train_tiny
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from tunelab.recipes import get_recipe_class

from tunelab.config import parse_config
from tunelab.models.load import load_model, load_tokenizer


def adapted(model) -> dict[str, LoraLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("method-runs")


# ---- LoRA / rsLoRA -------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [("lora", 16 / 16), ("rslora", 16 / math.sqrt(16))])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(name, expected):
    layers = adapted(build({"name": name, "r": 16, "alpha": 16}))
    assert len(layers) == LAYERS * len(LINEARS)
    assert {layer.scaling["default"] for layer in layers.values()} == {expected}


@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "v_proj"], {"self_attn.q_proj", "self_attn.v_proj"}),
    (r".*\.mlp\.(up|down)_proj", {"mlp.up_proj", "mlp.down_proj"}),
    ("all-linear", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
])
def test_target_modules_accepts_names_regex_and_all_linear(targets, expected):
    layers = adapted(build({"name": "lora", "target_modules": targets}))
    assert set(layers) == {f"model.layers.{i}.{suffix}" for i in range(LAYERS) for suffix in expected}


def test_target_modules_matching_nothing_is_a_clear_error(capsys, tmp_path):
    config = (REPO / "configs/tiny/lora.yaml").read_text().replace("target_modules: all-linear", "target_modules: [qq_proj]")
    config = config.replace("configs/data", str(REPO / "configs/data"))
    code, _, err = run_cli(capsys, "train", str(write_config(tmp_path, config)), "--output", str(tmp_path / "run"))
    assert code == 2 and "recipe.target_modules ['qq_proj'] matched no module" in err


# ---- QLoRA ---------------------------------------------------------------------------

def test_qlora_base_is_nf4_double_quantized_and_prepared_for_kbit_training():
    import bitsandbytes as bnb

    fp32_base = load_model(tiny_config({"name": "lora"}).model)
    model = build({"name": "qlora", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}, dtype="bfloat16")
    linears = [m.base_layer for m in adapted(model).values()]
    assert len(linears) == LAYERS * len(LINEARS)
    for linear in linears:
        assert isinstance(linear, bnb.nn.Linear4bit)
        state = linear.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # nested = double quantization
        assert linear.compute_dtype == torch.float32
        assert not linear.weight.requires_grad
    # k-bit preparation: every non-quantized weight (norms, embeddings) was upcast from bf16 to fp32.
    others = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert others and all(p.dtype == torch.float32 for p in others)
    # Resident memory: the linear weights take 4 bits (+ small quantization constants) instead of 32.
    linear_bytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
    fp32_bytes = sum(i * o for i, o in LINEARS) * LAYERS * 4
    assert linear_bytes == fp32_bytes // 8
    assert model.get_memory_footprint() < 0.45 * fp32_base.get_memory_footprint()


def test_qlora_evaluation_leaves_the_4bit_weights_as_training_reads_them(monkeypatch):
    # On a CPU with avx512_bf16, bitsandbytes would repack every 4-bit weight on the first
    # no-grad eval forward and then compute in bf16, with no backward through the base.
    # Pretend to be such a CPU: the switch must come off at load, on every machine.
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = build({"name": "qlora", "compute_dtype": "float32"})
    linears = [m.base_layer for m in adapted(model).values()]
    assert len(linears) == LAYERS * len(LINEARS)
    assert not any(linear.support_avx512bf16_for_cpu for linear in linears)
    evaluated = probe_logits(model)  # eval mode, no gradients
    assert not any(getattr(linear.weight.quant_state, "packing_format_for_cpu", False) for linear in linears)
    # The same model, never evaluated, in training mode: same logits, and after an evaluation
    # training computes the same gradients as training without one.
    never_evaluated = build({"name": "qlora", "compute_dtype": "float32"}).train()
    ids = torch.randint(3, 500, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_training = never_evaluated(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    assert torch.equal(evaluated, in_training)
    for each in (model.train(), never_evaluated):
        each(input_ids=ids, labels=ids).loss.backward()
    grads = [{n: p.grad for n, p in each.named_parameters() if p.requires_grad} for each in (model, never_evaluated)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_a_folder_saved_in_4_bit_loads_with_the_same_layout_switch_off(monkeypatch, tmp_path):
    import bitsandbytes.nn.modules as bnb_modules
    from transformers import BitsAndBytesConfig

    from tunelab.models.trained import load_model_or_run

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on a CPU with avx512_bf16
    config = tiny_config({"name": "lora"})
    quantized = load_model(config.model, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    quantized.save_pretrained(tmp_path / "nf4")
    load_tokenizer(config.model).save_pretrained(tmp_path / "nf4")
    model, _ = load_model_or_run(tmp_path / "nf4")
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == LAYERS * len(LINEARS) and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_qlora_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util

    from tunelab.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(UserError, match=r'tunelab\[quant\]'):
        tiny_config({"name": "qlora"})


# ---- DoRA ----------------------------------------------------------------------------

def test_dora_magnitudes_exist_train_and_change(runs_dir):
    result = train_tiny("dora", runs_dir)
    layers = adapted(result.model)
    changed = 0
    for layer in layers.values():
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad and magnitude.shape == (layer.out_features,)
        # DoRA starts each magnitude at the row norm of the frozen base weight.
        initial = layer.get_base_layer().weight.norm(dim=1)
        changed += int((magnitude - initial).abs().max() > 1e-4)
    assert len(layers) == LAYERS * len(LINEARS) and changed == len(layers)


# ---- prefix / P-tuning ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["prefix", "ptuning"])
def test_virtual_tokens_are_prepended_trained_and_generation_works(name, runs_dir):
    result = train_tiny(name, runs_dir)
    model, tokenizer = result.model.eval(), result.tokenizer
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        if name == "prefix":
            # One trained key/value pair per virtual token at every layer.
            cache = model.get_prompt(batch_size=1)
            assert cache.get_seq_length() == 16
        else:
            # The soft prompt precedes the real tokens in the sequence the base model sees.
            assert model(input_ids=prompt).logits.shape[1] == 16 + 4
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (1, 4 + 3) and torch.equal(output[:, :4], prompt)
    untrained = build({"name": name, "num_virtual_tokens": 16})
    trained_params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    assert trained_params and any(
        not torch.equal(v, dict(untrained.named_parameters())[k]) for k, v in trained_params.items()
    )


@pytest.mark.parametrize("name", ["prefix", "ptuning"])
def test_prompt_methods_refuse_gradient_checkpointing(name, capsys):
    code, _, err = run_cli(capsys, "validate", str(REPO / f"configs/tiny/{name}.yaml"),
                           "training.gradient_checkpointing=true")
    assert code == 2 and f'recipe "{name}" does not work with training.gradient_checkpointing' in err


# ---- BitFit --------------------------------------------------------------------------

def test_bitfit_trains_only_added_zero_biases(runs_dir, tiny_model_dir):
    built = build({"name": "bitfit"})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert torch.equal(probe_logits(built), probe_logits(base))  # zero biases change nothing yet
    result = train_tiny("bitfit", runs_dir)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
    base_weights = dict(base.named_parameters())
    for name, parameter in result.model.named_parameters():
        if not name.endswith(".bias"):
            assert torch.equal(parameter, base_weights[name]), name
    manifest = json.loads((result.run_dir / "adapter" / "bitfit.json").read_text())
    assert len(manifest["added_biases"]) == LAYERS * len(LINEARS)


def test_bitfit_trains_existing_biases_of_qwen2_attention(tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    parsed = parse_config({
        "model": {"name_or_path": str(tmp_path / "qwen2"), "dtype": "float32"},
        "recipe": {"name": "bitfit", "add_missing_biases": False},
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion"}]},
    })
    model = get_recipe_class("bitfit")(parsed.recipe).build(load_model(parsed.model), parsed)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    # Qwen2 has biases on q, k and v only: 32 + 16 + 16 per layer.
    assert sum(trainable.values()) == 2 * (32 + 16 + 16)
    assert all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for n in trainable)


# ---- full ----------------------------------------------------------------------------

def test_full_trains_every_parameter_with_8bit_adamw(runs_dir):
    result = train_tiny("full", runs_dir, "training.optimizer=adamw_bnb_8bit", steps=10)
    assert result.summary["trainable_parameters"] == result.summary["total_parameters"]
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5


def test_paged_optimizer_without_cuda_is_refused(capsys, tmp_path):
    config = (REPO / "configs/tiny/full.yaml").read_text().replace("configs/data", str(REPO / "configs/data"))
    code, _, err = run_cli(capsys, "train", str(write_config(tmp_path, config)), "--output", str(tmp_path / "run"),
                           "training.optimizer=paged_adamw_8bit")
    assert code == 2 and "needs a CUDA GPU" in err and "adamw_bnb_8bit" in err
