"""``tunelab run PIPELINE.yaml``: stages (train, synth, eval) run in order, each feeding the next.

Every stage writes into ``<output_dir>/<stage name>``; later stages name earlier outputs through
OmegaConf interpolation (``${output_dir}/teacher``), so the wiring is visible in the file. A stage
is skipped when its fingerprint is unchanged: the hash of its resolved settings, of every local
file or folder its settings name, and of the fingerprints of the earlier stages whose output it
reads. The fingerprint is stored in the stage's folder (``.tunelab-stage.json``) after the stage
succeeds, so a stage that failed or was interrupted runs again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tunelab.config.schema import Section
from tunelab.errors import UserError
from tunelab.io import atomic_write_text

STAMP = ".tunelab-stage.json"


class Stage(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["train", "synth", "eval"]
    config: str | None = None  # train / synth: the stage's YAML config
    overrides: list[str] = []  # key=value overrides of that config
    # eval: the model or run to evaluate and the data to evaluate it on
    model: str | None = None
    data: str | None = None
    format: str = "prompt_completion"
    max_samples: Annotated[int, Field(ge=1)] = 200
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    batch_size: Annotated[int, Field(ge=1)] = 32

    @model_validator(mode="after")
    def _needs(self) -> Stage:
        if self.kind in ("train", "synth") and self.config is None:
            raise ValueError(f'stage "{self.name}" ({self.kind}) needs "config": the YAML config it runs')
        if self.kind == "eval" and (self.model is None or self.data is None):
            raise ValueError(f'stage "{self.name}" (eval) needs "model" and "data"')
        return self


class Pipeline(Section):
    output_dir: str
    stages: Annotated[list[Stage], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self) -> Pipeline:
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique; {sorted({n for n in names if names.count(n) > 1})} repeat")
        return self


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    from tunelab.synth.config import load_typed

    pipeline = load_typed(path, overrides, Pipeline)
    for stage in pipeline.stages:  # the rest of a stage's config is checked when it runs: it may read earlier outputs
        if stage.config is not None and not Path(stage.config).is_file():
            raise UserError(f'stage "{stage.name}": config file {stage.config} does not exist; check the path.')
    return pipeline


def config_kind(path: str | Path) -> str:
    """"pipeline", "synth" or "train", from a config file's top-level keys (``validate`` checks any of them)."""
    import yaml

    try:
        keys = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return "train"  # the train loader explains what is wrong with the file
    if isinstance(keys, dict) and "stages" in keys:
        return "pipeline"
    return "synth" if isinstance(keys, dict) and {"teacher", "seeds"} <= keys.keys() else "train"


# ---- stages: resolved settings and how each runs --------------------------------------------


def _train_settings(stage: Stage) -> Any:
    from tunelab.config import load_config

    return load_config(stage.config, stage.overrides)


def _synth_settings(stage: Stage) -> Any:
    from tunelab.synth.config import load_synth_config

    return load_synth_config(stage.config, stage.overrides)


def _run_train(stage: Stage, settings: Any, out: Path) -> None:
    from tunelab.train.run import train

    train(settings, output_dir=out, overwrite=True)


def _run_synth(stage: Stage, settings: Any, out: Path) -> None:
    from tunelab.synth.run import format_report, synthesize

    print(format_report(synthesize(settings, out), out))


def _run_eval(stage: Stage, settings: Any, out: Path) -> None:
    from tunelab.eval.evaluate import evaluate, format_table, to_json

    result = evaluate(stage.model, stage.data, stage.format, stage.max_samples, stage.max_new_tokens, stage.batch_size)
    print(format_table(result), end="")
    atomic_write_text(out / "results.json", to_json(result))


# kind -> (resolve settings (validates before anything runs), run)
KINDS: dict[str, tuple[Callable[[Stage], Any], Callable[[Stage, Any, Path], None]]] = {
    "train": (_train_settings, _run_train),
    "synth": (_synth_settings, _run_synth),
    "eval": (lambda stage: stage, _run_eval),
}


# ---- fingerprints ------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _hash_path(path: Path, digest: Any) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)


def fingerprint(settings: dict, upstream: dict[Path, str]) -> str:
    """Hash of the settings and of every existing path they name (an earlier stage's output by its fingerprint)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for text in sorted(set(_strings(settings))):
        if "\n" in text or len(text) > 4096:
            continue
        path = Path(text).expanduser()
        try:
            if not path.exists():
                continue
        except OSError:
            continue
        resolved = path.resolve()
        if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
            continue  # "." or a parent folder is where things run, not an input
        owner = next((fp for folder, fp in upstream.items() if resolved == folder or folder in resolved.parents), None)
        digest.update(text.encode())
        if owner is not None:
            digest.update(owner.encode())
        else:
            _hash_path(path, digest)
    return digest.hexdigest()


def _stored(out: Path) -> str | None:
    try:
        return json.loads((out / STAMP).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def run_pipeline(pipeline: Pipeline) -> list[tuple[str, str]]:
    """Run the stages in order; returns (stage name, "ran" | "skipped") for each."""
    root, upstream, done = Path(pipeline.output_dir), {}, []
    for stage in pipeline.stages:
        out = root / stage.name
        resolve, run = KINDS[stage.kind]
        settings = resolve(stage)
        dumped = settings.model_dump(mode="json", exclude={"output_dir"})
        if stage.kind != "eval":  # the stage's own output folder is not an input
            dumped = {"stage": stage.kind, "settings": dumped}
        fp = fingerprint(dumped, upstream)
        if _stored(out) == fp:
            print(f"tunelab: stage {stage.name} ({stage.kind}): inputs unchanged, skipped (output in {out})")
            done.append((stage.name, "skipped"))
        else:
            print(f"tunelab: stage {stage.name} ({stage.kind}): running, output in {out}")
            run(stage, settings, out)
            atomic_write_text(out / STAMP, json.dumps({"fingerprint": fp, "kind": stage.kind}) + "\n")
            done.append((stage.name, "ran"))
        upstream[out.resolve()] = fp
    print("tunelab: pipeline done: " + ", ".join(f"{name} {what}" for name, what in done))
    return done
