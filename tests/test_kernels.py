"""Kernels on the CPU (the PyTorch path): equal to PEFT and the unfused loss, fewer saved bytes, the report,
the refusals, and a short training run with and without the kernels. Triton: tests/test_kernels_triton.py."""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import lora_grads, peft_block, rel_err, saved_activation_bytes, twin
from recipe_helpers import build, train_tiny

from conftest import run_cli, write_config
from tunelab.errors import UserError
from tunelab.kernels.backend import resolve
from tunelab.kernels.linear_ce import causal_lm_loss, linear_cross_entropy
from tunelab.kernels.lora_linear import BaseWeight, lora_linear, lora_linear_reference
from tunelab.kernels.lora_mlp import lora_mlp, lora_mlp_reference
from tunelab.kernels.lora_qkv import lora_qkv
from tunelab.kernels.patch import patch_model

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# --- functions vs plain autograd ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,dims", [((13,), (45, 29, 5)), ((2, 7), (33, 65, 1)), ((3, 1, 5), (17, 19, 16))])
def test_lora_linear_forward_and_every_gradient_equal_plain_autograd(dtype, lead, dims):
    d_in, d_out, r = dims
    torch.manual_seed(1)
    x = torch.randn(*lead, d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    a = (torch.randn(r, d_in, dtype=dtype) / d_in**0.5).requires_grad_()
    b = torch.randn(d_out, r, dtype=dtype).requires_grad_()
    dy = torch.randn(*lead, d_out, dtype=dtype)
    y = lora_linear(x, BaseWeight(w), a, b, 1.7)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    # Reference in fp32 from the same inputs: the exact answer the bf16 result is measured against.
    leaves = [t.detach().float().requires_grad_() for t in (x, a, b)]
    want = lora_linear_reference(leaves[0], w.float(), leaves[1], leaves[2], 1.7)
    want_grads = torch.autograd.grad(want, leaves, dy.float())
    assert y.shape == want.shape and y.dtype == dtype
    assert rel_err(y, want) <= TOL[dtype]
    for got, expected in zip(grads, want_grads):
        assert got.dtype == dtype and rel_err(got, expected) <= TOL[dtype]


def _dense(d_out, d_in, r):
    return (torch.randn(d_out, d_in) / d_in**0.5, torch.randn(r, d_in) / d_in**0.5, torch.randn(d_out, r), 0.9)


def test_lora_mlp_and_qkv_blocks_equal_plain_autograd():
    torch.manual_seed(2)
    x = torch.randn(3, 11, 45, requires_grad=True)
    gate, up, down = _dense(77, 45, 5), _dense(77, 45, 5), _dense(45, 77, 5)
    params = [t.requires_grad_() for p in (gate, up, down) for t in p[1:3]]
    fused = lora_mlp(x, *[(BaseWeight(p[0]), *p[1:]) for p in (gate, up, down)])
    want = lora_mlp_reference(x, gate, up, down)
    assert rel_err(fused, want) <= 1e-5
    for got, expected in zip(torch.autograd.grad(fused.sum(), [x, *params]), torch.autograd.grad(want.sum(), [x, *params])):
        assert rel_err(got, expected) <= 1e-5

    q, k, v = _dense(45, 45, 3), _dense(21, 45, 3), _dense(21, 45, 3)
    params = [t.requires_grad_() for p in (q, k, v) for t in p[1:3]]
    outs = lora_qkv(x, *[(BaseWeight(p[0]), *p[1:]) for p in (q, k, v)])
    wants = [lora_linear_reference(x, *p) for p in (q, k, v)]
    # k's output unused: its gradients are None in both, and x's gradient sums q and v only.
    loss, want_loss = outs[0].sum() + (outs[2] ** 2).sum(), wants[0].sum() + (wants[2] ** 2).sum()
    got = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    expected = torch.autograd.grad(want_loss, [x, *params], allow_unused=True)
    for out, w in zip(outs, wants):
        assert rel_err(out, w) <= 1e-5
    for g, e in zip(got, expected):
        assert (g is None) == (e is None) and (g is None or rel_err(g, e) <= 1e-5)


# --- patched PEFT models vs PEFT ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_peft_block_equals_peft(dtype):
    """fp32: fused equals PEFT (1e-5). bf16: both round differently, so both are measured against the same
    weights evaluated in fp32. Through this two-level block (q/k/v + o, then the MLP) the largest error over
    output and gradients measured 0.96e-2 to 1.99e-2 for PEFT and 1.07e-2 to 1.59e-2 fused (6 seeds), so the
    fused block is held to 2e-2 here; single kernels to 1e-2 above."""
    peft = peft_block(dtype=dtype)
    fused, exact = twin(peft), twin(peft).float()
    report = patch_model(fused, "torch")
    assert sorted(set(report.patched.values())) == ["linear", "mlp", "qkv"] and not report.refused
    x = torch.randn(2, 9, 45, dtype=dtype)
    outs = {}
    for name, model in (("peft", peft), ("fused", fused), ("exact", exact)):
        outs[name] = model((x.float() if name == "exact" else x).clone().requires_grad_())
        outs[name].pow(2).sum().backward()
    want = lora_grads(exact)
    pairs = [(outs["fused"], outs["peft"], outs["exact"] if dtype == torch.bfloat16 else outs["peft"])]
    theirs = lora_grads(peft)
    pairs += [(g, theirs[n], want[n] if dtype == torch.bfloat16 else theirs[n]) for n, g in lora_grads(fused).items()]
    for got, theirs, truth in pairs:
        assert rel_err(got, truth) <= (1e-5 if dtype == torch.float32 else 2e-2), (rel_err(got, truth), rel_err(theirs, truth))


def _random_b(model):
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("recipe", ["lora", "qlora"])
def test_patched_tiny_llama_equals_peft_loss_and_gradients(recipe):
    """LoRA over nn.Linear and QLoRA over bitsandbytes 4-bit NF4 (dequantized on the fly): the fused model's
    loss (fused linear cross-entropy too) and every adapter gradient equal PEFT's."""
    peft = _random_b(build({"name": recipe, "r": 8, "alpha": 16}))
    fused = copy.deepcopy(peft)
    report = patch_model(fused, "torch")
    assert len(report.patched) == 14 and not report.refused and not report.loss_refusal
    ids = torch.randint(3, 500, (2, 19), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100
    peft.train(), fused.train()
    want = peft(input_ids=ids, labels=labels)
    with report.loss_context(True):
        got = fused(input_ids=ids, labels=labels)
    assert got.logits.shape[1] == 0  # the head computed nothing
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    got.loss.backward(), want.loss.backward()
    expected = lora_grads(peft)
    for name, grad in lora_grads(fused).items():
        assert rel_err(grad, expected[name]) <= 1e-5, name
    if recipe == "qlora":  # the base stays packed 4-bit: nothing dequantized was kept
        assert all(p.dtype == torch.uint8 for n, p in fused.named_parameters() if "base_layer" in n and p.ndim == 2)


# --- fused linear cross-entropy ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 23])
def test_linear_cross_entropy_equals_unfused_loss_and_gradients(dtype, num_items):
    torch.manual_seed(3)
    hidden = torch.randn(5, 13, 32, dtype=dtype, requires_grad=True)
    weight = (torch.randn(97, 32, dtype=dtype) / 4).requires_grad_()
    labels = torch.randint(0, 97, (5, 13))
    labels[0, :7] = labels[3, 2:] = -100  # ignored rows
    fused = linear_cross_entropy(hidden, weight, labels, num_items, chunk=16)  # several chunks
    reduction = "mean" if num_items is None else "sum"
    want = F.cross_entropy((hidden @ weight.t()).float().view(-1, 97), labels.view(-1), ignore_index=-100, reduction=reduction)
    want = want if num_items is None else want / num_items
    assert fused.dtype == torch.float32 and abs(fused.item() - want.item()) <= 1e-6 * abs(want.item())
    got = torch.autograd.grad(fused * 3, (hidden, weight))
    expected = torch.autograd.grad(want * 3, (hidden, weight))
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= TOL[dtype]
    assert got[0][0, :7].abs().max() == 0  # ignored rows get no gradient


def test_causal_lm_loss_shifts_like_transformers_and_skips_frozen_head_gradient():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(4)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # frozen, as in LoRA training: no dW is computed
    labels = torch.randint(0, 40, (2, 9))
    labels[1, :4] = -100
    got = causal_lm_loss(hidden, weight, labels, num_items_in_batch=torch.tensor(30))
    want = ForCausalLMLoss(hidden @ weight.t(), labels, 40, num_items_in_batch=torch.tensor(30))
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert rel_err(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0]) <= 1e-5
    nothing = torch.full((1, 3), -100)  # no labelled token: nan like the unfused mean
    assert torch.isnan(linear_cross_entropy(hidden[:1, :3], weight, nothing))


# --- the report and the refusals ---------------------------------------------------

def test_report_names_what_was_refused_and_why():
    dropout = patch_model(peft_block(lora_dropout=0.1), "torch")
    assert not dropout.patched and len(dropout.refused) == 7
    assert set(dropout.refused.values()) == {"lora_dropout 0.1 > 0 (set recipe.dropout: 0 to fuse)"}
    assert "7 LoRA layers keep PEFT's forward: lora_dropout 0.1 > 0" in dropout.describe()

    dora = patch_model(build({"name": "dora", "r": 4, "alpha": 8}), "torch")
    assert len(dora.refused) == 14 and set(dora.refused.values()) == {"DoRA (no kernel covers this LoRA variant)"}
    assert not dora.loss_refusal  # the loss is fused all the same
    gatera = patch_model(build({"name": "gatera", "r": 4, "alpha": 8}), "torch")
    assert set(gatera.refused.values()) == {"GateRA gate (no kernel covers this layer type)"}

    from peft import LoraConfig, get_peft_model
    from torch import nn
    biased = get_peft_model(nn.Sequential(nn.Linear(8, 8, bias=True), nn.Linear(8, 4, bias=False)),
                            LoraConfig(r=2, target_modules=["0", "1"]))
    report = patch_model(biased, "torch")
    assert report.refused == {"base_model.model.0": "a bias (the kernels have none)"}
    assert report.patched == {"base_model.model.1": "linear"}

    prefix = patch_model(build({"name": "prefix", "num_virtual_tokens": 4}), "torch")
    assert prefix.loss_refusal == "prompt-learning adapters keep the full-logits loss" and not prefix.patched
    off = patch_model(build({"name": "lora", "r": 4, "alpha": 8}), "off")
    assert off.backend is None and not off.patched and off.describe().startswith("tunelab: kernels off")
    sharded = patch_model(build({"name": "lora", "r": 4, "alpha": 8}), "torch", strategy="fsdp")
    assert sharded.backend is None and "fsdp" in sharded.describe()


def test_patched_layers_fall_back_to_peft_when_adapters_are_disabled():
    peft = peft_block()
    fused = twin(peft)
    patch_model(fused, "torch")
    x = torch.randn(4, 45)
    with fused.disable_adapter(), peft.disable_adapter():
        assert torch.equal(fused(x), peft(x))


def test_triton_without_a_gpu_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r'training.kernels is "triton" but this machine has no CUDA GPU'):
        resolve("triton")
    assert resolve("auto") == "torch" and resolve("off") is None
    from recipe_helpers import run_yaml

    code, out, err = run_cli(capsys, "train", str(write_config(tmp_path, run_yaml(kernels="triton", max_steps=1))),
                             "--output", str(tmp_path / "run"))
    assert code == 2 and 'training.kernels is "triton" but this machine has no CUDA GPU' in err
    assert "parameters trainable" not in out  # refused before the model was loaded


# --- training with and without ------------------------------------------------------

def test_training_with_kernels_equals_training_without(tmp_path):
    """Same loss at every step (fp32, 1e-5) and the same adapter, with gradient accumulation
    (the Trainer's num_items_in_batch normalisation goes through the fused loss)."""
    common = ("training.gradient_accumulation_steps=2", "training.micro_batch_size=8")
    fused = train_tiny("lora", tmp_path, "training.kernels=torch", *common, steps=10)
    plain = train_tiny("lora", tmp_path, "training.kernels=off", *common, steps=10)
    assert fused.model.tunelab_kernels.patched and not fused.model.tunelab_kernels.loss_refusal
    losses = [r["loss"] for r in _records(fused)], [r["loss"] for r in _records(plain)]
    assert len(losses[0]) == 10 and losses[0][0] > losses[0][-1]
    for got, want in zip(*losses):
        assert abs(got - want) <= 1e-5 * want
    want = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    for name, p in fused.model.named_parameters():
        if p.requires_grad:
            assert rel_err(p, want[name]) <= 1e-5, name


def _records(result):
    import json

    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


# --- CPU speed and activation memory ------------------------------------------------

def test_cpu_path_saves_fewer_activation_bytes_and_is_not_slower_than_peft():
    """A Llama-shaped block scaled down (hidden 256, MLP 688, k/v 128, r 16, 1024 tokens): big enough
    that the matmuls, not Python calls, take the time. bench/kernels.py --cpu measures larger shapes."""
    peft = peft_block(r=16, dims=(256, 688, 128))
    fused = twin(peft)
    patch_model(fused, "torch")
    x = torch.randn(4, 256, 256, requires_grad=True)
    _, peft_bytes = saved_activation_bytes(lambda: peft(x), peft)
    _, fused_bytes = saved_activation_bytes(lambda: fused(x), fused)
    assert fused_bytes < 0.6 * peft_bytes, (fused_bytes, peft_bytes)

    def median_time(model):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            model(x).sum().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    median_time(peft), median_time(fused)  # warm-up
    peft_s, fused_s = median_time(peft), median_time(fused)
    print(f"saved activations: PEFT {peft_bytes} B, fused {fused_bytes} B; fwd+bwd median PEFT {peft_s * 1e3:.2f} ms, "
          f"fused {fused_s * 1e3:.2f} ms")
    # Timing on a shared CI machine is noisy: the bench script measures at real sizes; here a margin.
    assert fused_s <= 1.3 * peft_s


def test_loss_chunks_are_smaller_on_a_cpu_than_on_a_gpu():
    """A GPU keeps busy with 32 M-logit chunks; a CPU keeps 4 M (the vs_trl levers table measures both)."""
    from tunelab.kernels.linear_ce import chunk_rows

    assert chunk_rows(32000, "cuda") == 1024 and chunk_rows(32000, "cpu") == 128
    assert chunk_rows(128256, "cuda") == 256 and chunk_rows(128256, "cpu") == 32
    assert chunk_rows(10**7, "cpu") == 16  # never fewer than 16 rows
