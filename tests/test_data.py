"""Data stage basics: formats normalise, label masks are exact, bad rows are named."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunelab.config.schema import DataConfig
from tunelab.data.collate import PadCollator
from tunelab.data.encode import IGNORE_INDEX, build_splits, encode_example
from tunelab.data.formats import to_example
from tunelab.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX])


def test_prompt_completion_trains_only_the_answer_and_end_of_turn(tokenizer):
    example = to_example({"prompt": "What is 2 plus 3?", "completion": "5"}, "prompt_completion", "row 0")
    encoded = encode_example(example, tokenizer, train_on_inputs=False)
    assert tokenizer.decode(encoded.input_ids) == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert trained_text(tokenizer, encoded) == "5<|im_end|>\n"
    # The mask is a prefix of -100 followed by exactly the assistant tokens.
    prompt_len = len(tokenizer(encoded.prompt, add_special_tokens=False).input_ids)
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert encoded.labels[prompt_len:] == encoded.input_ids[prompt_len:]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in encoded.labels
    assert (encoded.prompt, encoded.answer) == ("<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n", "5")


def test_train_on_inputs_trains_everything(tokenizer):
    example = to_example({"instruction": "Add", "input": "2 3", "output": "5"}, "alpaca", "row 0")
    encoded = encode_example(example, tokenizer, train_on_inputs=True)
    assert encoded.labels == encoded.input_ids


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    encoded = encode_example(to_example({"messages": messages}, "messages", "row 0"), tokenizer, train_on_inputs=False)
    assert trained_text(tokenizer, encoded) == "hello<|im_end|>\nciao<|im_end|>\n"
    assert encoded.answer == "ciao"


def test_text_format_trains_all_tokens_and_eos(tokenizer):
    encoded = encode_example(to_example({"text": "3+4=7"}, "text", "row 0"), tokenizer, train_on_inputs=False)
    assert encoded.labels == encoded.input_ids
    assert encoded.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"prompt": "x"}, "prompt_completion", 'row 7: field "completion" is missing, but format "prompt_completion" needs it'),
        ({"text": 5}, "text", 'row 7: field "text" is a int, not text'),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "row 7: the conversation has no assistant message"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "row 7: message 0 needs a role in system, user, assistant"),
    ],
)
def test_bad_rows_are_named(row, fmt, message):
    with pytest.raises(UserError, match=message):
        to_example(row, fmt, "row 7")


def test_overlong_policies_are_counted(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "short"}, {"text": "a much longer line of text " * 10}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"datasets": [{"path": str(path), "format": "text"}], "max_length": 16}
    truncated = build_splits(DataConfig(**config), tokenizer, seed=0)
    assert [len(e.input_ids) <= 16 for e in truncated.train] == [True, True] and truncated.stats["truncated_overlong"] == 1
    dropped = build_splits(DataConfig(**config, overlong="drop"), tokenizer, seed=0)
    assert len(dropped.train) == 1 and dropped.stats["dropped_overlong"] == 1
    with pytest.raises(UserError, match=r'row 1 has \d+ tokens, more than data.max_length=16'):
        build_splits(DataConfig(**config, overlong="error"), tokenizer, seed=0)


def test_collator_pads_and_masks(tokenizer):
    short = encode_example(to_example({"text": "hi"}, "text", "r"), tokenizer, False)
    long = encode_example(to_example({"text": "hello there friend"}, "text", "r"), tokenizer, False)
    batch = PadCollator(pad_token_id=0)([short, long])
    n = len(short.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()


def test_committed_quickstart_data_matches_its_generator(tmp_path):
    from pathlib import Path

    from tunelab.data.synthetic import write_quickstart_data

    write_quickstart_data(tmp_path)
    committed = Path(__file__).resolve().parents[1] / "configs" / "data" / "quickstart"
    for name in ("pretrain.jsonl", "train.jsonl", "eval.jsonl", "retention.jsonl"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    eval_prompts = {json.loads(line)["prompt"] for line in (committed / "eval.jsonl").read_text().splitlines()}
    train_prompts = {json.loads(line)["prompt"] for line in (committed / "train.jsonl").read_text().splitlines()}
    assert len(eval_prompts) == 100 and not eval_prompts & train_prompts  # held out for real


def test_builtin_tokenizer_splits_every_number_into_digits(tokenizer):
    assert not [t for t in tokenizer.get_vocab() if sum(ch.isdigit() for ch in t) > 1]
    assert tokenizer.tokenize("439,440") == ["4", "3", "9", ",", "4", "4", "0"]
