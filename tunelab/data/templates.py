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

TEMPLATES = {"chatml": CHATML}


def apply_template_choice(tokenizer: PreTrainedTokenizerBase, name: str | None) -> None:
    """Set the chat template used for training (and saved with the tokenizer).

    ``None`` keeps the tokenizer's own template, which must then exist. Names are
    checked by the config schema, so ``name`` is always a key of ``TEMPLATES``.
    """
    if name is not None:
        tokenizer.chat_template = TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise UserError(
            "the tokenizer has no chat template and data.chat_template is unset; "
            f"set data.chat_template to one of {', '.join(TEMPLATES)}."
        )
