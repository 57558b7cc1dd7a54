"""Built-in chat templates for base models whose tokenizer has none."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tunelab.errors import UserError, did_you_mean

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML}


def apply_template_choice(tokenizer: PreTrainedTokenizerBase, name: str | None) -> None:
    """Set the chat template used for training (and saved with the tokenizer).

    ``None`` keeps the tokenizer's own template, which must then exist.
    """
    if name is not None:
        if name not in TEMPLATES:
            raise UserError(
                f'data.chat_template "{name}" is not a built-in template{did_you_mean(name, TEMPLATES)}; '
                f"choose one of {', '.join(TEMPLATES)} or leave it unset to use the tokenizer's own."
            )
        tokenizer.chat_template = TEMPLATES[name]
    elif not tokenizer.chat_template:
        raise UserError(
            "the tokenizer has no chat template and data.chat_template is unset; "
            f"set data.chat_template to one of {', '.join(TEMPLATES)}."
        )
