"""Load a teacher: any causal LM tunelab can load, and check that two tokenizers agree.

A teacher may be a tunelab run folder (its trained adapter or model, rebuilt exactly as
trained by ``load_trained``), a Hugging Face folder, a hub id or a built-in model. Both
``tunelab synth`` and the ``distill`` recipe load teachers through here, so the same
reference means the same model in both.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from tunelab.config.schema import ModelConfig, Section
from tunelab.errors import UserError
from tunelab.io import expand_path, looks_like_local_path
from tunelab.models.load import load_model, load_tokenizer


class TeacherTraining(Section):
    """How to make the teacher when its folder holds no finished run: a train config and overrides."""

    config: str
    overrides: list[str] = []


def ensure_trained(reference: str, training: TeacherTraining | None, key: str) -> None:
    """Train the teacher into ``reference`` first when it is not there yet, so a fresh clone needs no preparation.

    An existing finished run is used as it is (delete the folder to train it again).
    """
    if training is None or (expand_path(reference) / "summary.json").is_file():
        return
    from tunelab.config import load_config
    from tunelab.train.run import train

    print(f"tunelab: {key} {reference} holds no finished run; training the teacher first ({training.config})")
    # Training reseeds every generator; restore them so the caller's next draws (e.g. a student
    # adapter's initialisation) are the same whether or not the teacher had to be trained.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    train(load_config(training.config, training.overrides), output_dir=reference, overwrite=True)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def load_teacher(reference: str, key: str, dtype: str = "auto",
                 training: TeacherTraining | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for ``reference``; ``key`` names the config key in errors."""
    ensure_trained(reference, training, key)
    path = expand_path(reference)
    if (path / "config.yaml").is_file():  # a tunelab run: the trained model, not its base
        from tunelab.models.trained import load_trained

        model, tokenizer = load_trained(path)
    else:
        if not path.exists() and looks_like_local_path(reference):
            raise UserError(f'{key} "{reference}" does not exist; train the teacher first or fix the path.')
        config = ModelConfig(name_or_path=reference, dtype=dtype)
        model, tokenizer = load_model(config).eval(), load_tokenizer(config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so EOS is safe
    model.requires_grad_(False)
    return model, tokenizer


def check_same_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, teacher_key: str,
                         student_name: str) -> None:
    """Logit distillation compares distributions token id by token id, so the vocabularies must be identical."""
    a, b = teacher.get_vocab(), student.get_vocab()
    if a != b:
        differ = sum(1 for token, index in a.items() if b.get(token) != index) + len(b.keys() - a.keys())
        raise UserError(
            f"{teacher_key} has a different tokenizer from the student {student_name} ({len(a)} vs {len(b)} tokens, "
            f"{differ} differ); logit distillation needs one shared tokenizer, so pick a teacher of the student's "
            "family, or distil through the text it generates (tunelab synth) instead."
        )



def identity(reference: str) -> str:
    """The reference plus, for a local folder, every file's path, size and modification time.

    Resume keys include it, so retraining a teacher in place never lets a rerun reuse replies of
    the old weights; hashing the weights themselves would cost minutes on large models.
    """
    path = expand_path(reference)
    if not path.is_dir():
        return reference
    stats = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file())
    return f"{reference}#{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}"
