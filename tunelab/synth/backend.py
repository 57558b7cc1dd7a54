"""Teacher backends: conversations in, replies out, with the config's sampling settings.

``TransformersBackend`` batches ``model.generate`` on CPU or GPU; ``VllmBackend`` does the same
through vLLM when it is installed and a CUDA GPU is present. Both render prompts with the
teacher's own chat template and take a seed per batch, so a batch's replies depend only on
its prompts, the settings and that seed (which is what makes runs repeatable and resumable).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from tunelab.data.formats import Message
from tunelab.errors import UserError
from tunelab.eval.heldout import stop_token_ids


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0


class Backend(Protocol):
    name: str  # the teacher reference, recorded in provenance and in the resume journal's keys

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seed: int) -> list[str]: ...


class TransformersBackend:
    def __init__(self, model: torch.nn.Module, tokenizer, name: str):
        if not tokenizer.chat_template:
            raise UserError(f"teacher {name} has no chat template; use a chat model or a run trained with data.chat_template.")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.stops = stop_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, conversations: list[list[Message]], sampling: Sampling, seed: int) -> list[str]:
        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        device = next(self.model.parameters()).device
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                               add_special_tokens=False).to(device)
        if sampling.temperature > 0:
            options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "top_k": sampling.top_k or None}
        else:
            options = {"do_sample": False}
        torch.manual_seed(seed)
        output = self.model.generate(**batch, max_new_tokens=sampling.max_new_tokens, eos_token_id=self.stops,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     repetition_penalty=sampling.repetition_penalty, **options)
        return [text.strip() for text in self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :],
                                                                      skip_special_tokens=True)]


class VllmBackend:
    """Not verified here (no GPU, vLLM not installable on this machine); same interface as above."""

    def __init__(self, reference: str, dtype: str):
        from vllm import LLM

        self.name = reference
        self.llm = LLM(model=reference, dtype=dtype if dtype != "auto" else "auto", seed=0)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seed: int) -> list[str]:
        from vllm import SamplingParams

        prompts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        params = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k or -1, repetition_penalty=sampling.repetition_penalty, seed=seed)
        return [result.outputs[0].text.strip() for result in self.llm.generate(prompts, params, use_tqdm=False)]


def vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_backend(reference: str, dtype: str, choice: str, key: str, training=None) -> Backend:
    """The backend ``choice`` (auto: vLLM when installed with a GPU and the teacher is a plain model folder or hub id)."""
    from pathlib import Path

    from tunelab.synth.teacher import load_teacher

    from tunelab.synth.teacher import ensure_trained

    ensure_trained(reference, training, f"{key}.path")
    is_run = (Path(reference) / "config.yaml").is_file()
    if choice == "vllm" and not vllm_usable():
        raise UserError(f"{key}.backend vllm needs the vllm package and a CUDA GPU; use backend transformers or auto.")
    if choice == "vllm" and is_run:
        raise UserError(f'{key}.path "{reference}" is a tunelab run; vLLM loads plain model folders, so run '
                        f"tunelab merge on it first, or use backend transformers.")
    if choice == "vllm" or (choice == "auto" and vllm_usable() and not is_run and not reference.startswith("builtin:")):
        return VllmBackend(reference, dtype)
    model, tokenizer = load_teacher(reference, f"{key}.path", dtype)  # already trained above
    return TransformersBackend(model, tokenizer, reference)


def settings_id(sampling: Sampling) -> dict:
    return asdict(sampling)
