"""Held-out metrics a reader understands: token loss / perplexity and exact-match accuracy.

They are measured on the eval split before and after training, so a run states in
plain numbers what fine-tuning changed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.collate import PadCollator
from tunelab.data.encode import IGNORE_INDEX, Encoded


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode for the block (restored afterwards, also on errors); yields the model's device."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: Sequence[Encoded], pad_token_id: int, batch_size: int) -> dict:
    """Mean cross-entropy over every trained (label != -100) token, and its perplexity."""
    collate = PadCollator(pad_token_id)
    total, count = 0.0, 0
    with _inference(model) as device:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            # Soft-prompt adapters (P-tuning) return logits for their virtual tokens first; keep the real ones.
            logits = logits[:, -batch["input_ids"].shape[1] :]
            targets = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the chat template's end-of-turn token, when the tokenizer has it as one token."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Encoded],
    max_new_tokens: int,
    batch_size: int,
) -> dict:
    """Share of chat examples whose greedy answer equals the reference (whitespace-stripped), and share containing it."""
    pairs = [(e.prompt, e.answer) for e in examples if e.prompt is not None and e.answer is not None]
    if not pairs:
        return {}
    stops = stop_token_ids(model, tokenizer)
    correct, contained, samples = 0, 0, []
    with _inference(model) as device:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            # Left padding: generation continues from the right end of every row.
            batch = tokenizer(
                [p for p, _ in chunk], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(device)
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
            )
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for (prompt, answer), text in zip(chunk, texts, strict=True):
                hit = text.strip() == answer.strip()
                correct += hit
                contained += answer.strip() in text
                if len(samples) < 5:
                    samples.append({"prompt": prompt, "expected": answer, "generated": text.strip(), "correct": hit})
    return {"exact_match": correct / len(pairs), "contains": contained / len(pairs), "exact_match_n": len(pairs),
            "samples": samples}
