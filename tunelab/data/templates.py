"""Built-in chat templates for base models whose tokenizer has none."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama 3 chat format; its markers must be single tokens of the tokenizer (Llama 3 tokenizers have them).
LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Alpaca-style plain text for base models with no special tokens at all; answers end with EOS.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] != 'system' %}{{ '\n\n' }}{% endif %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}
# Markers a template needs as single tokens: split into pieces they would neither stop
# generation nor be learned as one end-of-turn decision.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "alpaca": (),
}


def apply_template_choice(tokenizer: PreTrainedTokenizerBase, name: str | None) -> None:
    """Set the chat template used for training (and saved with the tokenizer).

    ``None`` keeps the tokenizer's own template, which must then exist. Names are
    checked by the config schema, so ``name`` is always a key of ``TEMPLATES``.
    """
    if name is not None:
        vocab = tokenizer.get_vocab()
        missing = [token for token in TEMPLATE_TOKENS[name] if token not in vocab]
        if missing:
            raise UserError(
                f"data.chat_template {name} needs {', '.join(missing)} as tokens, but this tokenizer lacks them; "
                f"choose a template whose markers it has ({', '.join(_usable(vocab))}) or a matching model."
            )
        tokenizer.chat_template = TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise UserError(
            "the tokenizer has no chat template and data.chat_template is unset; "
            f"set data.chat_template to one of {', '.join(TEMPLATES)}."
        )


def _usable(vocab: dict) -> list[str]:
    return [name for name, tokens in TEMPLATE_TOKENS.items() if all(t in vocab for t in tokens)]
