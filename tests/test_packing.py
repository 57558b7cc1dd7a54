"""Packing never lets examples see each other: packed loss and gradients equal unpacked ones."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import run_cli
from recipe_helpers import REPO, train_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data.encode import IGNORE_INDEX, encode_example
from tunelab.data.formats import to_example
from tunelab.data.packing import REAL_TOKENS_KEY, PackCollator, pack, padding_fraction


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": f"What is {a} plus {b}?" + " Think." * (a % 4), "completion": str(a + b)}
            for a, b in [(3, 4), (12, 30), (7, 1), (45, 45), (2, 9), (30, 3), (1, 1)]]
    return [encode_example(to_example(r, "prompt_completion", "r"), tokenizer, False) for r in rows]


def summed_loss(model, batch) -> torch.Tensor:
    logits = model(**batch).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_pack_keeps_every_example_whole_and_within_max_length(examples):
    rows = pack(examples, max_length=80)
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in examples)
    assert all(sum(len(e.input_ids) for e in row) <= 80 for row in rows)
    assert len(rows) < len(examples)
    assert [[id(e) for e in row] for row in pack(examples, 80)] == [[id(e) for e in row] for row in rows]
    assert padding_fraction([4, 2, 3, 3], batch_size=2) == pytest.approx(1 - 12 / 14)


def test_packed_loss_and_gradients_equal_unpacked(examples, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    unpacked_loss = 0.0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        loss = summed_loss(model, {"input_ids": ids, "labels": torch.tensor([example.labels])})
        loss.backward()
        unpacked_loss += float(loss)
    unpacked_grads = gradients(model)

    batch = PackCollator(pad_token_id=0)(pack(examples, max_length=80))
    batch.pop(REAL_TOKENS_KEY)
    assert batch["input_ids"].shape[0] >= 2 and (batch["input_ids"] == 0).any()  # several rows, with padding
    packed = summed_loss(model, batch)
    packed.backward()
    assert float(packed) == pytest.approx(unpacked_loss, rel=1e-5)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, unpacked_grads[name], rtol=1e-5, atol=1e-5, msg=name)

    # The same rows without per-example position ids are plain causal concatenation: examples
    # see each other and the loss changes. (The check above would catch that.)
    leaky = {k: v for k, v in batch.items() if k != "position_ids"}
    assert abs(float(summed_loss(model, leaky)) - unpacked_loss) > 1e-2


def test_packed_training_reports_the_padding_saved(tmp_path):
    rng = random.Random(0)
    data = tmp_path / "varied.jsonl"
    with data.open("w") as handle:
        for _ in range(300):
            a, b = rng.randrange(50), rng.randrange(50)
            prompt = f"What is {a} plus {b}?" + " Think." * rng.randrange(12)
            handle.write(json.dumps({"prompt": prompt, "completion": str(a + b)}) + "\n")
    result = train_tiny("lora", tmp_path, "data.packing=true", "data.max_length=128",
                        f"data.datasets=[{{path: {data}, format: prompt_completion}}]")
    data = result.summary["data"]
    assert data["packed_rows"] < result.summary["train_examples"]
    assert data["padding_fraction_packed"] < data["padding_fraction_unpacked"]
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5


def test_prompt_learning_with_packing_is_refused(capsys):
    code, _, err = run_cli(capsys, "validate", str(REPO / "configs/tiny/prefix.yaml"), "data.packing=true")
    assert code == 2 and 'recipe "prefix" cannot train on packed rows' in err
