"""The ``tunelab synth`` config: one typed section per part of the stage, unknown keys are errors.

Loaded like training configs (OmegaConf, ``key=value`` overrides, one sentence per problem with a
"did you mean"); the strategy's options are validated by the strategy's own model, as recipes do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from tunelab.config.schema import DatasetSource, Section
from tunelab.errors import UserError
from tunelab.synth.teacher import TeacherTraining

T = TypeVar("T", bound=Section)
REFUSALS = ["I'm sorry", "I am sorry", "I cannot", "I can't", "I am unable", "I'm unable", "As an AI", "as a language model"]


class TeacherConfig(Section):
    # A tunelab run folder (trained adapter or model), a Hugging Face folder, a hub id or builtin:<name>.
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: vLLM when it is installed, a CUDA GPU is present and the teacher is a plain model; else transformers.
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    # When path holds no finished run yet: train it first with this config, e.g. {config: configs/tiny/full.yaml}.
    train: TeacherTraining | None = None


class GenerationConfig(Section):
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(ge=0)] = 0.7  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0


class StrategyOptions(Section):
    """Base of every strategy's options; ``name`` picks the strategy."""

    name: str


class CriticConfig(Section):
    # null = the teacher judges its own candidates; otherwise any model reference, as for teacher.path.
    model: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # {prompt} and {answer} are filled in; the judge's first number is its score.
    prompt: str = (
        "Rate how well the answer responds to the question, from 1 (useless or wrong) to 10 (correct and helpful). "
        "Reply with the number only.\n\nQuestion: {prompt}\n\nAnswer: {answer}"
    )
    threshold: float = 7.0  # kept when score >= threshold
    max_new_tokens: Annotated[int, Field(ge=1)] = 8
    on_unparsed: Literal["drop", "keep"] = "drop"  # when the judge's reply holds no number

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        for name in ("{prompt}", "{answer}"):
            if name not in value:
                raise ValueError(f"critic.prompt must contain {name}; it is where the candidate goes")
        return value


class FilterConfig(Section):
    min_prompt_chars: Annotated[int, Field(ge=0)] = 1
    max_prompt_chars: Annotated[int, Field(ge=1)] = 8000
    min_answer_chars: Annotated[int, Field(ge=0)] = 1
    max_answer_chars: Annotated[int, Field(ge=1)] = 8000
    refusals: list[str] = REFUSALS  # phrases that mark a refusal ([] turns the check off)
    answer_pattern: str | None = None  # regex the whole answer must match, e.g. "\\d+"

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"filters.answer_pattern {value!r} is not a valid regex ({exc}); fix the pattern") from None
        return value


class DedupConfig(Section):
    exact: bool = True
    near: bool = True
    ngram: Annotated[int, Field(ge=1)] = 3  # word n-grams
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.7  # estimated Jaccard similarity at which a row is a near-duplicate
    num_perm: Annotated[int, Field(ge=8)] = 128
    bands: Annotated[int, Field(ge=1)] = 32

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.num_perm ({self.num_perm}) must be a multiple of dedup.bands ({self.bands})")
        return self


class OutputConfig(Section):
    format: Literal["prompt_completion", "alpaca", "messages"] = "prompt_completion"
    # rationale strategy: what the completion holds; the rationale is always stored in its own field too.
    target: Literal["answer", "rationale_and_answer"] = "answer"


class SynthConfig(Section):
    teacher: TeacherConfig
    seeds: DatasetSource  # seed prompts (and answers), any chat format tunelab reads
    strategy: SerializeAsAny[StrategyOptions]
    generation: GenerationConfig = GenerationConfig()
    critic: CriticConfig | None = None
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    output: OutputConfig = OutputConfig()
    seed: int = 0
    output_dir: str | None = None

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_options(cls, value: Any) -> StrategyOptions:
        from tunelab.config.load import parse_named_options
        from tunelab.errors import did_you_mean
        from tunelab.synth.strategies import STRATEGIES

        def strategy_options(name: str) -> type[StrategyOptions]:
            if name not in STRATEGIES:
                raise UserError(f'strategy.name "{name}" is not a strategy{did_you_mean(name, STRATEGIES)}; '
                                f"choose one of: {', '.join(sorted(STRATEGIES))}")
            return STRATEGIES[name].Options

        options, errors = parse_named_options(value, "strategy", strategy_options, "{name: evol_instruct, rounds: 4}")
        if errors:
            raise ValueError(" ".join(errors))
        return options

    @field_validator("seeds")
    @classmethod
    def _chat_seeds(cls, value: DatasetSource) -> DatasetSource:
        if value.format == "text":
            raise ValueError("seeds.format text has no prompts; use a chat format such as prompt_completion or alpaca")
        return value


def load_typed(path: str | Path, overrides: Sequence[str], model: type[T]) -> T:
    """Read and resolve a YAML file as training configs are (OmegaConf, overrides), then validate it
    with ``model``; every problem becomes one ``UserError`` sentence with "did you mean" help."""
    from tunelab.config.load import explain_errors, read_resolved

    raw = read_resolved(Path(path), overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError("\n".join(dict.fromkeys(explain_errors(exc, model)))) from None


def load_synth_config(path: str | Path, overrides: Sequence[str] = ()) -> SynthConfig:
    """Read, resolve and validate a synth config; the seed file must exist."""
    from tunelab.data.sources import local_files

    config = load_typed(path, overrides, SynthConfig)
    local_files(config.seeds, "seeds")
    return config
