"""Where rows come from: local files (jsonl/json/csv/parquet/txt, globs, folders) or hub ids.

Both go through ``datasets.load_dataset`` so users get the library's real behaviour;
the local-file checks here exist to fail before any model loads, with the path named.
"""

from __future__ import annotations

import codecs
import glob
import json
from pathlib import Path

import datasets

from tunelab.config.schema import DatasetSource
from tunelab.errors import UserError, first_line
from tunelab.io import expand_path, looks_like_local_path

# file suffix -> datasets builder
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_source(source: DatasetSource, key: str) -> datasets.Dataset:
    """Load one source as a ``datasets.Dataset`` (capped at ``max_samples`` rows)."""
    files = local_files(source, key)
    if files is not None:
        _check_readable(files, source, key)
    try:
        if files is not None:
            builder = LOCAL_BUILDERS[files[0].suffix]
            dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        else:
            dataset = datasets.load_dataset(
                source.path, name=source.name, split=source.split, data_files=source.data_files
            )
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        problem = _find_bad_line(files) if files is not None else None
        if problem:
            raise UserError(f"{key}: {problem}") from exc
        raise UserError(f'{key}.path "{source.path}" could not be loaded ({first_line(exc)}); check the file or dataset id.') from exc
    if source.max_samples is not None:
        dataset = dataset.select(range(min(source.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError(f'{key}.path "{source.path}" has no rows; point it at a non-empty dataset.')
    return dataset


def local_files(source: DatasetSource, key: str) -> list[Path] | None:
    """The local files a source names, or None for a hub dataset id.

    Raises ``UserError`` when a local source is missing, empty or of an unknown type,
    so ``tunelab validate`` catches it before any model loads.
    """
    path = expand_path(source.path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
    elif any(ch in source.path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    elif path.suffix in LOCAL_BUILDERS or looks_like_local_path(source.path):
        raise UserError(f'{key}.path "{source.path}" does not exist; check the path.')
    else:
        return None  # a hub dataset id such as "tatsu-lab/alpaca"
    if not files:
        raise UserError(f'{key}.path "{source.path}" matches no data file; expected one of {", ".join(LOCAL_BUILDERS)}.')
    suffixes = {f.suffix for f in files}
    unknown = suffixes - set(LOCAL_BUILDERS)
    if unknown:
        raise UserError(
            f'{key}.path "{source.path}" has files of unsupported type {", ".join(sorted(unknown))}; '
            f"use {', '.join(LOCAL_BUILDERS)}."
        )
    if len({LOCAL_BUILDERS[s] for s in suffixes}) > 1:
        raise UserError(f'{key}.path "{source.path}" mixes file types {", ".join(sorted(suffixes))}; give each type its own source.')
    return files


def _check_readable(files: list[Path], source: DatasetSource, key: str) -> None:
    """Empty sources and non-UTF-8 text fail here: ``datasets`` would crash on the first and garble the second."""
    if all(path.stat().st_size == 0 for path in files):
        raise UserError(f'{key}.path "{source.path}" is empty; point it at a file with rows.')
    for path in files:
        if path.suffix == ".parquet":
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{key}: {_find_bad_line([path])}") from None


def _find_bad_line(files: list[Path]) -> str | None:
    """Name the first line that is not UTF-8 (any file) or not JSON (JSON lines), for a failed load."""
    for path in files:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{path} line {number} is not valid UTF-8 text; re-save the file as UTF-8."
                if path.suffix == ".jsonl" and line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"{path} line {number} is not valid JSON ({exc.args[0].split(':')[0]}); fix or remove that line."
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                if _is_json_lines(path):
                    continue
                return f"{path} line {exc.lineno} is not valid JSON ({exc.msg}); fix the file."
    return None


def _is_json_lines(path: Path) -> bool:
    try:
        return all(json.loads(line) is not None for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except ValueError:
        return False
