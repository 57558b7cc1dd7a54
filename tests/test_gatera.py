"""GateRA: gated LoRA equals LoRA at gate 1, matches a plain-PyTorch reference, optimizes its entropy."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from peft import PeftModel, get_peft_model
from recipe_helpers import build, probe_logits, train_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments
from tunelab.recipes.gatera import GatedLinear, Gatera, GateraConfig, GateraOptions, binary_entropy, gated_layers

from tunelab.data.collate import PadCollator
from tunelab.data.encode import Encoded
from tunelab.train.trainer import RecipeTrainer


def randomize_lora_b(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("host", ["lora", "dora"])
def test_gate_fixed_at_one_equals_the_host_method_exactly(host):
    lora = build({"name": host, "r": 4, "alpha": 8})
    gated = build({"name": "gatera", "r": 4, "alpha": 8, "use_dora": host == "dora"})
    randomize_lora_b(lora)
    randomize_lora_b(gated)
    with torch.no_grad():
        for layer in gated_layers(gated):
            layer.lora_gate["default"].bias.fill_(100.0)  # sigmoid(100) == 1.0 exactly in fp32
    input_ids = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    outputs = [model.train()(input_ids=input_ids, labels=input_ids) for model in (lora, gated)]
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    for output in outputs:
        output.loss.backward()
    lora_grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    gated_grads = {n: p.grad for n, p in gated.named_parameters() if p.requires_grad and "lora_gate" not in n}
    assert lora_grads.keys() == gated_grads.keys()
    for name, grad in lora_grads.items():
        assert torch.equal(grad, gated_grads[name]), name


def test_gated_layer_gradients_match_a_plain_pytorch_reference():
    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(6, 5)))
    model = get_peft_model(net, GateraConfig(target_modules=["proj"], r=3, lora_alpha=6)).double()
    layer = next(m for m in model.modules() if isinstance(m, GatedLinear))
    with torch.no_grad():
        for parameter in (layer.lora_B["default"].weight, layer.lora_gate["default"].weight, layer.lora_gate["default"].bias):
            parameter.copy_(torch.randn_like(parameter))
    x = torch.randn(4, 7, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 7, 5, dtype=torch.float64)
    (model(x) * upstream).sum().backward()

    W, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = (layer.lora_A["default"].weight.detach().clone().requires_grad_(),
            layer.lora_B["default"].weight.detach().clone().requires_grad_())
    w, b = (layer.lora_gate["default"].weight.detach().clone().requires_grad_(),
            layer.lora_gate["default"].bias.detach().clone().requires_grad_())
    x_ref = x.detach().clone().requires_grad_()
    gate = torch.sigmoid(x_ref @ w.T + b)
    y = x_ref @ W.T + bias + gate * (x_ref @ A.T @ B.T) * (6 / 3)
    (y * upstream).sum().backward()
    pairs = [(x.grad, x_ref.grad), (layer.lora_A["default"].weight.grad, A.grad), (layer.lora_B["default"].weight.grad, B.grad),
             (layer.lora_gate["default"].weight.grad, w.grad), (layer.lora_gate["default"].bias.grad, b.grad)]
    for ours, reference in pairs:
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_entropy_term_is_in_the_optimized_loss(tmp_path):
    model = build({"name": "gatera", "r": 4, "alpha": 8, "entropy_weight": 0.5})
    randomize_lora_b(model)
    with torch.no_grad():
        for i, layer in enumerate(gated_layers(model)):
            layer.lora_gate["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    recipe = Gatera(GateraOptions(name="gatera", r=4, alpha=8, entropy_weight=0.5))
    trainer = RecipeTrainer(recipe=recipe, model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                            data_collator=PadCollator(0))
    # Second row is padded by 2: its padding gates must not count.
    batch = PadCollator(0)([Encoded([5, 6, 7, 8, 9], [-100, 6, 7, 8, 9]), Encoded([5, 6, 7], [-100, 6, 7])])
    optimized = trainer.compute_loss(model.train(), batch)
    lm_loss = model(**batch).loss
    mask = batch["attention_mask"].bool()
    entropy = torch.stack([binary_entropy(layer.last_gate.squeeze(-1)[mask]).mean() for layer in gated_layers(model)]).mean()
    assert float(optimized) == pytest.approx(float(lm_loss + 0.5 * entropy), rel=1e-6)
    assert float(entropy) > 0.1


def test_entropy_weight_drives_gates_toward_0_or_1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gatera")
    plain = train_tiny("gatera", tmp, "recipe.entropy_weight=0.0", "recipe.gate_init_bias=1.0")
    sharp = train_tiny("gatera", tmp, "recipe.entropy_weight=2.0", "recipe.gate_init_bias=1.0")
    last = [json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[-1]) for run in (plain, sharp)]
    for record in last:
        assert 0 <= record["gate_near_0"] <= 1 and 0 <= record["gate_near_1"] <= 1 and 0 < record["gate_mean"] < 1
    assert "gate_entropy_loss" not in last[0] and last[1]["gate_entropy_loss"] > 0
    binary = [r["gate_near_0"] + r["gate_near_1"] for r in last]
    assert binary[1] > binary[0] + 0.3, binary


def test_gates_are_saved_and_reload_through_tunelab_only(tmp_path_factory, tiny_model_dir):
    from tunelab.models.trained import load_trained

    run = train_tiny("gatera", tmp_path_factory.mktemp("gatera-save"))
    adapter = run.run_dir / "adapter"
    gate_keys = [k for k in load_file(adapter / "adapter_model.safetensors") if "lora_gate" in k]
    assert len(gate_keys) == 2 * len(gated_layers(run.model))  # weight and bias per gated layer
    reloaded, _ = load_trained(run.run_dir)
    assert torch.equal(probe_logits(reloaded), probe_logits(run.model))
    # Plain PEFT must not load the LoRA part and silently drop the gates.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(KeyError, match="GATERA"):
        PeftModel.from_pretrained(base, adapter)


def test_gated_adapter_refuses_to_merge():
    model = build({"name": "gatera", "r": 4})
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_loss_terms_are_scaled_like_the_lm_loss_under_accumulation(tmp_path):
    class ConstantTerm(Gatera):
        def loss_terms(self, model, inputs):
            return {"constant": torch.tensor(0.6)}

    model = build({"name": "lora", "r": 4})
    recipe = ConstantTerm(GateraOptions(name="gatera"))
    trainer = RecipeTrainer(recipe=recipe, model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                            data_collator=PadCollator(0))
    batch = PadCollator(0)([Encoded([5, 6, 7, 8, 9], [-100, 6, 7, 8, 9])])
    lm_mean = float(model.train()(**batch).loss)
    # Normalised over the whole accumulated batch (4 tokens here, 8 over 2 micro-batches): the
    # Trainer will not divide again, so the per-micro-batch term is divided by the 2 steps here.
    trainer.current_gradient_accumulation_steps = 2
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(8))
    assert float(loss) == pytest.approx(lm_mean * 4 / 8 + 0.6 / 2, rel=1e-6)
    # Without num_items_in_batch the Trainer divides the returned loss itself: the term is added whole.
    assert float(trainer.compute_loss(model, batch)) == pytest.approx(lm_mean + 0.6, rel=1e-6)
