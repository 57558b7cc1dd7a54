"""``tunelab generate`` and ``tunelab chat``: talk to a model or run through its saved chat template.

Works with an adapter on its (possibly 4-bit) base or with a merged folder; tokens
are streamed as they are produced. Generation stops at EOS or the template's
end-of-turn token.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

import torch
from transformers import TextStreamer

from tunelab.errors import UserError
from tunelab.eval.heldout import stop_token_ids
from tunelab.models.trained import load_model_or_run


class Session:
    """A loaded model and tokenizer plus the conversation so far."""

    def __init__(self, reference: str, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0):
        self.model, self.tokenizer = load_model_or_run(reference)
        if not self.tokenizer.chat_template:
            raise UserError(f"{reference} has no chat template; train with data.chat_template set, or use a chat model.")
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    @torch.no_grad()
    def reply(self, text: str, out: TextIO) -> str:
        """Stream the answer to ``text`` into ``out``; remember both turns; return the answer."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(self.model.parameters()).device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda piece, stream_end=False: print(piece, end="" if not stream_end else "\n",
                                                                           file=out, flush=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, streamer=streamer,
                                     eos_token_id=stop_token_ids(self.model, self.tokenizer),
                                     pad_token_id=self.tokenizer.pad_token_id, **sampling)
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat(session: Session, lines: Iterable[str], out: TextIO = sys.stdout) -> None:
    """Read user turns from ``lines`` until EOF or /exit; /reset starts a new conversation."""
    system = session.messages[:1] if session.messages and session.messages[0]["role"] == "system" else []
    print("tunelab chat: type a message; /reset starts over, /exit or Ctrl-D quits.", file=out)
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.messages = list(system)
            continue
        if text:
            print("assistant> ", end="", file=out, flush=True)
            session.reply(text, out)
