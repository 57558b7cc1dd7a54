"""The workload of bench/vs_trl.py: the model, the data, the FLOP count. Shared by the parent and its children.

Everything here is deterministic (fixed seeds), so every system and every repetition sees the same
model weights and the same examples.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1408  # with untied embeddings and vocab 32000 this makes 44.04 M parameters
    vocab: int = 32000
    tokenizer_vocab: int = 2048  # tunelab's byte-level BPE; the model's vocab (LM head size) stays `vocab`
    max_length: int = 512
    median_tokens: int = 100  # example length (prompt + completion, chat template included): lognormal
    sigma: float = 0.7  # lognormal shape: the long tail (about 1 example in 50 reaches 400+ tokens)
    micro_batch: int = 4
    rank: int = 16
    alpha: int = 32
    lr: float = 2e-4
    seed: int = 42
    steps: int = 30
    examples: int = 0  # 0: enough for `steps` packed batches with room to spare

    def n_examples(self) -> int:
        if self.examples:
            return self.examples
        mean = self.median_tokens * math.exp(self.sigma**2 / 2)
        return max(64, math.ceil(1.5 * self.steps * self.micro_batch * self.max_length / mean))


QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, tokenizer_vocab=512, max_length=128,
             median_tokens=40, steps=3, examples=48)


def workload_from_json(text: str) -> Workload:
    return Workload(**json.loads(text))


def workload_to_json(w: Workload) -> str:
    return json.dumps(asdict(w))


# ---------------------------------------------------------------- data
def _words(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (no digits), made of 2-4 syllables."""
    onsets = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl st tr sh ch th".split()
    vowels = "a e i o u ai ea ou io".split()
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def _zipf_sampler(rng: random.Random, words: list[str]):
    weights = [1 / (rank + 1) for rank in range(len(words))]
    return lambda k: rng.choices(words, weights=weights, k=k)


def tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = _words(random.Random(seed), 1500)
    draw = _zipf_sampler(rng, words)
    return [" ".join(draw(60)) + "." for _ in range(3000)]


def make_rows(w: Workload, count_tokens) -> list[dict]:
    """Prompt/completion rows whose chat-rendered length follows a lognormal (median ``w.median_tokens``),
    capped at ``w.max_length``. ``count_tokens(prompt, completion)`` gives the exact encoded length, so no
    example is ever truncated by any system."""
    rng = random.Random(w.seed)
    words = _words(random.Random(w.seed), 1500)
    draw = _zipf_sampler(rng, words)

    def row(prompt: list[str], completion: list[str]) -> dict:
        return {"prompt": " ".join(prompt).capitalize() + "?", "completion": " ".join(completion).capitalize() + "."}

    sample = [row(draw(20), draw(20)) for _ in range(20)]
    frame = count_tokens("A?", "B.")  # the chat template's own tokens
    per_word = sum(count_tokens(r["prompt"], r["completion"]) - frame for r in sample) / (20 * 40)
    rows = []
    for _ in range(w.n_examples()):
        target = min(w.max_length, max(frame + 4, round(rng.lognormvariate(math.log(w.median_tokens), w.sigma))))
        n_words = max(2, round((target - frame) / per_word))
        split = max(1, round(n_words * rng.uniform(0.3, 0.7)))
        prompt, completion = draw(split), draw(max(1, n_words - split))
        while count_tokens(**row(prompt, completion)) > w.max_length:  # never let a system truncate
            prompt, completion = prompt[: max(1, len(prompt) * 9 // 10)], completion[: max(1, len(completion) * 9 // 10)]
        rows.append(row(prompt, completion))
    return rows


def digest(pairs) -> str:
    """Order-independent hash of (input_ids, labels) pairs: equal for the same tokenized examples."""
    items = sorted(hashlib.sha256(json.dumps([list(map(int, i)), list(map(int, l))]).encode()).hexdigest() for i, l in pairs)
    return hashlib.sha256("".join(items).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- model
def build_model(w: Workload, out_dir: Path) -> dict:
    """A randomly initialised Llama of the workload's shape, with tunelab's byte-level BPE tokenizer.

    tunelab's tiny-model builder sizes the embedding to the tokenizer; here the model keeps vocab 32000
    (the LM head costs the same whichever ids occur), so the config is written directly.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tunelab.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_corpus(w.seed), w.tokenizer_vocab)
    assert len(tokenizer) <= w.vocab
    config = LlamaConfig(
        vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
        num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, max_position_embeddings=max(512, w.max_length),
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(w.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokenizer_tokens": len(tokenizer)}


def matmul_params(w: Workload) -> dict:
    """Parameters that take part in matmuls: the decoder body and the LM head (the embedding is a lookup)."""
    kv = w.hidden // w.heads * w.kv_heads
    per_layer = 2 * w.hidden * w.hidden + 2 * w.hidden * kv + 3 * w.hidden * w.intermediate
    lora_per_layer = w.rank * ((w.hidden + w.hidden) * 2 + (w.hidden + kv) * 2 + (w.hidden + w.intermediate) * 3)
    return {"body": w.layers * per_layer, "head": w.hidden * w.vocab, "lora": w.layers * lora_per_layer}


FLOPS_FORMULA = (
    "useful model FLOPs, counted from the data each system consumed (T = non-padding input tokens, "
    "L = tokens that carry loss; Nb = decoder-body matmul parameters, Nh = LM-head parameters, Nl = LoRA parameters). "
    "lora/qlora: T*(2*Nb + 2*Nb + 6*Nl) + L*(2*Nh + 2*Nh): forward, backward through the frozen weights for the "
    "activation gradient only, forward+backward+weight-gradient of the adapters; the frozen head runs forward and "
    "backward only where a label is. full: T*6*Nb + L*6*Nh. Not counted: attention scores (below 1% at these lengths), "
    "norms, activations, the optimizer, and recomputation by gradient checkpointing (model FLOPs, not hardware FLOPs). "
    "MFU = FLOPs / (train seconds * measured fp32 peak of F.linear); mfu_bf16 uses the bf16 peak instead."
)


def model_flops(w: Workload, variant: str, real_tokens: int, loss_tokens: int) -> float:
    p = matmul_params(w)
    if variant == "full":
        return real_tokens * 6 * p["body"] + loss_tokens * 6 * p["head"]
    return real_tokens * (4 * p["body"] + 6 * p["lora"]) + loss_tokens * 4 * p["head"]
