"""recipe distill: divergences against a reference, offline cache = online, a student that really learns."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from conftest import run_cli
from recipe_helpers import REPO
from test_synth import trained_teacher

from tunelab.recipes.distill import divergence, teacher_distribution, top_k_logits
from tunelab.config import parse_config
from tunelab.recipes import get_recipe_class


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return trained_teacher(tmp_path_factory)


# ---- reference: plain Python, float64, one position at a time ----------------------------------


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def reference(student: list[float], teachers: list[tuple[list[float], int | None]], weights: list[float], kind: str,
              temperature: float, beta: float) -> float:
    """Teachers' top-k (or full) softmax at T, weighted mixture; student renormalised over the mixture's support."""
    vocab = len(student)
    mixture = [0.0] * vocab
    for (logits, k), weight in zip(teachers, weights, strict=True):
        keep = sorted(range(vocab), key=lambda i: -logits[i])[: k or vocab]
        probs = _softmax([logits[i] / temperature for i in keep])
        for i, p in zip(keep, probs, strict=True):
            mixture[i] += p * weight / sum(weights)
    support = [i for i in range(vocab) if mixture[i] > 0]
    p = [mixture[i] for i in support]
    q = _softmax([student[i] / temperature for i in support])
    if kind == "forward_kl":
        value = _kl(p, q)
    elif kind == "reverse_kl":
        value = _kl(q, p)
    else:
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return value * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_divergences_match_a_reference_computation(kind, top_k):
    generator = torch.Generator().manual_seed(0)
    n, vocab, temperature, beta = 6, 11, 2.0, 0.3
    student = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3
    teachers = [torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 3 for _ in range(2)]
    weights = [1.0, 3.0]
    probs = teacher_distribution([top_k_logits(t, top_k) for t in teachers], weights, vocab, temperature)
    ours = divergence(student, probs.double(), kind, temperature, beta)
    for row in range(n):
        expected = reference(student[row].tolist(), [(t[row].tolist(), top_k) for t in teachers], weights, kind,
                             temperature, beta)
        assert abs(ours[row].item() - expected) < 1e-6
    # One teacher over the full vocabulary: the textbook definitions, and zero when student = teacher.
    p = torch.softmax(teachers[0] / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    if kind == "forward_kl":
        textbook = (p * (p.log() - q.log())).sum(-1) * temperature**2
        single = teacher_distribution([top_k_logits(teachers[0], None)], [1.0], vocab, temperature).double()
        assert torch.allclose(divergence(student, single, kind, temperature), textbook, atol=1e-6)
    assert divergence(teachers[0], p, kind, temperature, beta).abs().max() < 1e-6


def distill_config(teacher, tmp_path, **recipe):
    raw = {
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "recipe": {"name": "distill", "teachers": [{"path": str(teacher), "dtype": "float32"}], "top_k": 16,
                   "student": {"name": "full"}, **recipe},
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion",
                               "max_samples": 64}], "max_length": 64},
        "training": {"max_steps": 5, "micro_batch_size": 8},
        "output_dir": str(tmp_path),
    }
    return parse_config(raw)


def test_offline_cache_gives_the_online_loss(teacher, tmp_path):
    from tunelab.config.schema import ModelConfig
    from tunelab.data.collate import PadCollator
    from tunelab.models.load import load_model

    losses = {}
    base = load_model(ModelConfig(name_or_path="builtin:tiny-llama", dtype="float32"))
    for mode in ("offline", "online"):
        config = distill_config(teacher, tmp_path / mode, mode=mode, loss="jsd", temperature=2.0, kd_weight=0.7,
                                teachers=[{"path": str(teacher), "dtype": "float32"},
                                          {"path": str(teacher), "dtype": "float32", "weight": 0.5}])
        recipe = get_recipe_class("distill")(config.recipe)
        model = recipe.build(copy.deepcopy(base), config)
        tokenizer = recipe_tokenizer(config)
        inputs = PadCollator(tokenizer.pad_token_id)(recipe._training_rows(config, tokenizer)[:8])
        outputs = model(**inputs)
        loss, logged = recipe.objective(model, inputs, outputs, outputs.loss, (inputs["labels"][:, 1:] != -100).sum())
        losses[mode] = (loss.item(), logged["kd_loss"].item())
        assert (recipe.stored != []) == (mode == "offline") and (recipe.teachers != []) == (mode == "online")
    assert (tmp_path / "offline/teacher_logits/teacher1/logits.safetensors").is_file()
    assert losses["offline"] == pytest.approx(losses["online"], abs=1e-5)
    assert losses["offline"][1] > 0.1  # an untrained student is far from the teacher


def recipe_tokenizer(config):
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(config.model)


def test_student_learns_from_the_teacher_and_kd_loss_falls(teacher, tmp_path, capsys):
    """Untrained tiny Llama, fully trained by distillation (top-16 forward KL + CE) on 256 quickstart questions."""
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "recipe": {"name": "distill", "teachers": [{"path": str(teacher), "dtype": "float32"}], "top_k": 16,
                   "kd_weight": 0.5, "student": {"name": "full"}},
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion",
                               "max_samples": 512}],
                 "eval_datasets": [{"path": str(REPO / "configs/data/quickstart/eval.jsonl"), "format": "prompt_completion"}],
                 "max_length": 64},
        "training": {"max_steps": 100, "micro_batch_size": 16, "learning_rate": 3.0e-3, "warmup_steps": 5, "logging_steps": 5},
        "eval": {"max_samples": 50, "max_new_tokens": 5, "batch_size": 50},
    }))
    code, out, err = run_cli(capsys, "train", str(config), "--output", str(tmp_path / "run"))
    assert code == 0, err
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < 0.25 * before["loss"]  # measured: 6.26 -> about 0.9
    assert after["exact_match"] >= before["exact_match"] + 0.1
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kd_loss"] < 0.3 * records[0]["kd_loss"]
    assert (tmp_path / "run/model").is_dir() and (tmp_path / "run/teacher_logits/teacher0/index.json").is_file()


def test_lora_student_saves_and_reloads_through_its_recipe(teacher, tmp_path):
    from recipe_helpers import probe_logits

    from tunelab.models.trained import load_trained
    from tunelab.train.run import train

    config = distill_config(teacher, tmp_path / "x", mode="online", loss="reverse_kl", top_k=None,
                            student={"name": "lora", "r": 4, "alpha": 8})
    result = train(config.model_copy(update={"eval": config.eval.model_copy(update={"before_training": False,
                                                                                      "exact_match": False})}),
                   output_dir=tmp_path / "lora")
    assert (tmp_path / "lora/adapter/adapter_config.json").is_file()
    reloaded, _ = load_trained(tmp_path / "lora")
    assert torch.allclose(probe_logits(result.model), probe_logits(reloaded), atol=1e-6)
    saved = yaml.safe_load((tmp_path / "lora/config.yaml").read_text())["recipe"]
    assert saved["student"] == {"name": "lora", "target_modules": "all-linear", "r": 4, "alpha": 8.0, "dropout": 0.0,
                                "bias": "none", "modules_to_save": None}

    from transformers import AutoModelForCausalLM

    from tunelab.export.merge import merge_run

    merge_run(tmp_path / "lora", tmp_path / "merged")  # the LoRA student merges like any LoRA run
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(probe_logits(merged), probe_logits(reloaded), atol=1e-5)

    # A run that saved an adapter serves as a teacher too (loaded on its base by load_trained).
    from test_synth import quickstart_rows, synth_config, write_jsonl

    from tunelab.synth.run import synthesize

    seeds = write_jsonl(tmp_path / "seeds.jsonl", quickstart_rows(4))
    report = synthesize(synth_config(tmp_path / "lora", seeds, filters={}), tmp_path / "synth")
    assert report["generated"] == 4 and report["teacher"] == str(tmp_path / "lora")


def test_tokenizer_mismatch_and_bad_options_are_one_sentence(teacher, tmp_path, capsys):
    from tunelab.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=400)
    capsys.readouterr()
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "recipe": {"name": "distill", "teachers": [{"path": str(other)}], "student": {"name": "lora"}},
        "data": {"datasets": [{"path": str(REPO / "configs/data/quickstart/train.jsonl"), "format": "prompt_completion",
                               "max_samples": 8}]},
        "training": {"max_steps": 1},
    }))
    code, _, err = run_cli(capsys, "train", str(config), "--output", str(tmp_path / "run"))
    errors = [line for line in err.splitlines() if line.startswith("tunelab: error:")]
    assert code == 2 and len(errors) == 1
    assert "recipe.teachers[0].path" in err and "different tokenizer" in err and "Traceback" not in err

    code, _, err = run_cli(capsys, "validate", str(config), "recipe.student.rr=4")
    assert code == 2 and 'unknown key "recipe.student.rr" (did you mean "r"?)' in err
    code, _, err = run_cli(capsys, "validate", str(config), "recipe.mode=offline", "recipe.top_k=null")
    assert code == 2 and "recipe.top_k must be set" in err
    code, _, err = run_cli(capsys, "validate", str(config), "recipe.los=jsd")
    assert code == 2 and 'did you mean "loss"' in err
    code, _, err = run_cli(capsys, "validate", str(config), "data.packing=true")
    assert code == 2 and "data.packing must be false" in err
    code, _, err = run_cli(capsys, "train", str(config), f"recipe.teachers=[{{path: {tmp_path}/none}}]",
                           "--output", str(tmp_path / "run2"))
    assert code == 2 and "recipe.teachers[0].path" in err and "does not exist" in err


def test_gradient_accumulation_gives_the_same_steps(teacher, tmp_path):
    """KD sums are normalised like the Trainer's LM loss, so 2 micro-batches of 4 = 1 of 8 (loss and gradient)."""
    from tunelab.train.run import train

    logs = {}
    for name, micro, accumulation in (("whole", 8, 1), ("accumulated", 4, 2)):
        config = distill_config(teacher, tmp_path / name, kd_weight=0.5, student={"name": "lora", "r": 4})
        config = config.model_copy(update={
            "training": config.training.model_copy(update={"max_steps": 3, "micro_batch_size": micro,
                                                           "gradient_accumulation_steps": accumulation}),
            "eval": config.eval.model_copy(update={"before_training": False, "exact_match": False})})
        train(config, output_dir=tmp_path / name)
        logs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for whole, accumulated in zip(logs["whole"], logs["accumulated"], strict=True):
        assert whole["loss"] == pytest.approx(accumulated["loss"], abs=1e-5)
        assert whole["grad_norm"] == pytest.approx(accumulated["grad_norm"], abs=1e-5)


def test_teacher_with_a_padded_embedding_matches_the_unpadded_one():
    """Same tokenizer, wider output layer (padding rows never predicted): the same distribution."""
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    padded = torch.cat([logits, torch.full((4, 3), -1e4, dtype=torch.float64)], dim=-1)
    for k in (None, 5):
        plain = teacher_distribution([top_k_logits(logits, k)], [1.0], 9, 1.5)
        wide = teacher_distribution([top_k_logits(padded, k)], [1.0], 9, 1.5)
        assert torch.allclose(plain, wide, atol=1e-12) and torch.allclose(plain.sum(-1), torch.ones(4, dtype=torch.float64))
