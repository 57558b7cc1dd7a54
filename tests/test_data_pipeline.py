"""Data pipeline: every format and template masks exactly, mixing, caching, inspection, bad input."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli, write_config
from recipe_helpers import REPO
from transformers import AutoTokenizer

import tunelab.data.encode as encode_module
from tunelab.config.schema import DataConfig, DatasetSource
from tunelab.data.cache import cached_splits
from tunelab.data.encode import IGNORE_INDEX, build_splits, encode_example
from tunelab.data.formats import to_example
from tunelab.data.templates import apply_template_choice
from tunelab.errors import UserError


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def assert_mask(tokenizer, encoded, pieces: list[tuple[str, bool]]) -> None:
    """The example is exactly these text pieces; trained ones carry their own ids as labels, the rest -100."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert encoded.input_ids == ids
    assert encoded.labels == labels


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ciao"},
]


def test_chatml_masks_every_assistant_turn_and_its_end_of_turn(tokenizer):
    apply_template_choice(tokenizer, "chatml")
    encoded = encode_example(to_example({"messages": CHAT}, "messages", "r"), tokenizer, False)
    assert_mask(tokenizer, encoded, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", True),
        ("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>\n", True),
    ])


def test_last_turn_only(tokenizer):
    apply_template_choice(tokenizer, "chatml")
    encoded = encode_example(to_example({"messages": CHAT}, "messages", "r"), tokenizer, False, assistant_turns="last")
    assert_mask(tokenizer, encoded, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", False),
        ("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
        ("ciao<|im_end|>\n", True),
    ])


def test_llama3_template_masks_exactly_and_trains_eot(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                  "bos_token": "<|begin_of_text|>"})
    apply_template_choice(tokenizer, "llama-3")
    encoded = encode_example(to_example({"messages": CHAT[:3]}, "messages", "r"), tokenizer, False)
    assert_mask(tokenizer, encoded, [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("hello<|eot_id|>", True),
    ])
    assert encoded.labels[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_llama3_template_needs_its_tokens(tokenizer):
    with pytest.raises(UserError, match=r"data.chat_template llama-3 needs <\|start_header_id\|>.*lacks them.*\(chatml, alpaca\)"):
        apply_template_choice(tokenizer, "llama-3")


def test_alpaca_template_trains_answer_and_eos(tokenizer):
    apply_template_choice(tokenizer, "alpaca")
    example = to_example({"instruction": "Add", "input": "2 3", "output": "5"}, "alpaca", "r", system_prompt="Solve it.")
    encoded = encode_example(example, tokenizer, False)
    assert_mask(tokenizer, encoded, [
        ("Solve it.\n\n### Instruction:\nAdd\n\n2 3\n\n### Response:\n", False),
        ("5<|endoftext|>", True),
    ])
    assert encoded.labels[-1] == tokenizer.eos_token_id


def test_sharegpt_roles_and_system_prompt(tokenizer):
    apply_template_choice(tokenizer, "chatml")
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    example = to_example(row, "sharegpt", "r", system_prompt="Be brief.")
    assert example.messages == CHAT[:3]
    # A row with its own system message keeps it.
    own = {"conversations": [{"from": "system", "value": "Own."}, *row["conversations"]]}
    assert to_example(own, "sharegpt", "r", system_prompt="Be brief.").messages[0] == {"role": "system", "content": "Own."}
    with pytest.raises(UserError, match=r"r: message 0 needs a from in system, human, user, gpt"):
        to_example({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "r")


def test_field_mapping(tokenizer):
    example = to_example({"question": "2+2?", "answer": "4"}, "prompt_completion", "r", {"prompt": "question", "completion": "answer"})
    assert [m["content"] for m in example.messages] == ["2+2?", "4"]
    with pytest.raises(UserError, match=r'r: field "answer" is missing, but format "prompt_completion" needs it'):
        to_example({"question": "2+2?"}, "prompt_completion", "r", {"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match=r'fields key "promt" is not a field of format prompt_completion \(did you mean "prompt"\?\)'):
        DatasetSource(path="x.jsonl", format="prompt_completion", fields={"promt": "question"})


def test_weights_and_caps_mix_sources_without_eval_leaks(tmp_path, tokenizer):
    apply_template_choice(tokenizer, "chatml")
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(40)])
    data = DataConfig(datasets=[DatasetSource(path=a, format="prompt_completion", weight=2.0),
                                DatasetSource(path=b, format="prompt_completion", weight=0.5, max_samples=30)],
                      eval_ratio=0.1, cache=False)
    splits = build_splits(data, tokenizer, seed=0)
    assert splits.stats["data.datasets[0] examples"] == 40 and splits.stats["data.datasets[1] examples"] == 15
    # 35 distinct examples, 4 held out; a held-out row's repeats leave the training side with it.
    assert len(splits.eval) == 4 and 55 - 2 * 4 <= len(splits.train) <= 55 - 4
    assert not {tuple(e.input_ids) for e in splits.eval} & {tuple(e.input_ids) for e in splits.train}


def test_cache_is_reused_only_when_nothing_changed(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": f"q{i}", "completion": "a"} for i in range(10)])
    data = DataConfig(datasets=[DatasetSource(path=str(path), format="prompt_completion")])
    apply_template_choice(tokenizer, "chatml")
    first, hit = cached_splits(data, tokenizer, 0, build_splits)
    assert not hit

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(encode_module, "encode_example", no_encoding)
    again, hit = cached_splits(data, tokenizer, 0, build_splits)
    assert hit and [e.input_ids for e in again.train] == [e.input_ids for e in first.train]
    monkeypatch.undo()

    apply_template_choice(tokenizer, "alpaca")  # another template: rebuilt
    changed, hit = cached_splits(data, tokenizer, 0, build_splits)
    assert not hit and changed.train[0].input_ids != first.train[0].input_ids
    apply_template_choice(tokenizer, "chatml")
    write_jsonl(path, [{"prompt": f"q{i}", "completion": "b"} for i in range(10)])  # other content: rebuilt
    assert not cached_splits(data, tokenizer, 0, build_splits)[1]
    assert not cached_splits(data.model_copy(update={"max_length": 100}), tokenizer, 0, build_splits)[1]
    assert not cached_splits(data, tokenizer, 1, build_splits)[1]  # other seed
    assert cached_splits(data, tokenizer, 0, build_splits)[1]


@pytest.mark.parametrize(("content", "message"), [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n', r'd.jsonl line 2 is not valid JSON \(Expecting'),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n', r"d.jsonl line 2 is not valid UTF-8 text"),
    (b"", r'd.jsonl" is empty'),
    (b'{"prompt": "a"}\n', r'row 0: field "completion" is missing, but format "prompt_completion" needs it'),
])
def test_bad_data_files_fail_in_one_sentence_and_leave_no_result(content, message, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(content)
    config = write_config(tmp_path, f"""
model: {{name_or_path: "builtin:tiny-llama"}}
recipe: lora
data: {{datasets: [{{path: {tmp_path / 'd.jsonl'}, format: prompt_completion}}]}}
""")
    code, _, err = run_cli(capsys, "train", str(config), "--output", str(tmp_path / "run"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: data.datasets[0]")
    assert re.search(message, lines[0]), lines[0]
    assert not any((tmp_path / "run" / name).exists() for name in ("summary.json", "adapter", "metrics.jsonl"))


def test_rows_left_without_trained_tokens_are_dropped_counted_and_warned(tmp_path, tokenizer, capsys):
    apply_template_choice(tokenizer, "chatml")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "long question " * 20, "completion": "a"},
                                              {"prompt": "q", "completion": "a"}])
    data = DataConfig(datasets=[DatasetSource(path=path, format="prompt_completion")], max_length=16, cache=False)
    splits = build_splits(data, tokenizer, seed=0)
    assert len(splits.train) == 1 and splits.stats["dropped_no_trained_tokens"] == 1
    assert "1 rows had no trained token left after truncation" in capsys.readouterr().err


def test_data_command_marks_trained_tokens_and_prints_statistics(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = run_cli(capsys, "data", "configs/tiny/lora.yaml", "-n", "1", "data.packing=true")
    assert code == 0
    assert "[[" in out and "<|im_end|>" in out.split("[[")[1]  # the answer and its end-of-turn are trained
    assert "<|im_start|>assistant\n[[" in out
    assert "train: 897 examples" in out and "of tokens carry loss" in out and "p90" in out
    assert "truncated" in out and "packing: 897 examples in" in out


def test_hub_code_path_with_name_split_and_data_files(tmp_path, tokenizer):
    # "json" is not a local path, so it goes through load_dataset(path, name, split, data_files) like a hub id.
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(6)])
    data = DataConfig(datasets=[DatasetSource(path="json", format="text", data_files=path, split="train[:4]")], cache=False)
    assert len(build_splits(data, tokenizer, seed=0).train) == 4


def test_the_template_used_is_saved_with_the_tokenizer(tmp_path):
    from recipe_helpers import train_tiny

    result = train_tiny("lora", tmp_path, "data.chat_template=alpaca", steps=2)
    saved = (result.run_dir / "adapter" / "chat_template.jinja").read_text()
    assert "### Instruction" in saved and "<|im_start|>" not in saved
