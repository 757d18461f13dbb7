"""Dataset files, read through the `datasets` library: JSONL, JSON, Parquet, Arrow and CSV
files, or a folder written by `Dataset.save_to_disk`.

Every problem is a `DataFileError` naming the file and, where it is about a row, the row's
number (1-based, counted across the files in the order given), so that the config check
can report it as field / value / rule / fix before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# file suffix -> the `datasets` builder that reads it
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
           ".csv": "csv"}  # fmt: skip


class DataFileError(ValueError):
    """A dataset file that cannot be read: `rule` says what is wrong, `fix` what to do."""

    def __init__(self, rule: str, fix: str) -> None:
        super().__init__(f"{rule}. Fix: {fix}")
        self.rule, self.fix = rule, fix


def _format_of(path: Path) -> str:
    if path.is_dir():
        return "disk"
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataFileError(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}",
            f"use one of {sorted(FORMATS)}, or a folder written by Dataset.save_to_disk",
        )
    return builder


def _check_json_lines(path: Path) -> None:
    """JSON Lines parse errors with their line number (`datasets` gives none)."""
    try:
        _check_lines(path)
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})",
                            "save the file as UTF-8") from None  # fmt: skip


def _check_lines(path: Path) -> None:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(
                    f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno})",
                    "write one JSON object per line",
                ) from None
            if not isinstance(row, dict):
                raise DataFileError(
                    f"{path} line {number}: a JSON {type(row).__name__}, not an object",
                    'write one object per line, like {"prompt": "...", "label": "..."}',
                )


def _from_disk(path: Path) -> Any:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataFileError(
            f"{path} is a folder but not one written by save_to_disk ({e})",
            "point at a dataset file, or at a folder written by Dataset.save_to_disk",
        ) from None
    if isinstance(ds, DatasetDict):
        splits = sorted(ds)
        raise DataFileError(
            f"{path} holds several splits ({', '.join(splits)})",
            f"point at one of them: {path / splits[0]}",
        )
    assert isinstance(ds, Dataset)
    return ds


def read_rows(files: list[str]) -> list[dict[str, Any]]:
    """The rows of `files` (one format), in order: a list of dicts, one per row."""
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    if not files:
        raise DataFileError("no files given", "list at least one file")
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        if not path.exists():
            raise DataFileError(f"{path}: no such file", "check the path (relative paths are "
                                "read from the directory relay runs in)")  # fmt: skip
    kinds = {_format_of(p) for p in paths}
    if len(kinds) > 1:
        raise DataFileError(
            f"the files mix formats ({', '.join(sorted(kinds))})",
            "convert them to one format, or keep one of them",
        )
    kind = kinds.pop()
    if kind == "disk":
        from datasets import concatenate_datasets

        parts = [_from_disk(p) for p in paths]
        try:
            ds = concatenate_datasets(parts)
        except Exception as e:  # different fields or types
            raise DataFileError(f"the folders' datasets do not join: {str(e)[:200]}",
                                "give folders with the same fields and types") from None  # fmt: skip
    else:
        if kind == "json":
            for p in paths:
                if p.suffix.lower() == ".jsonl":
                    _check_json_lines(p)
        try:
            ds = load_dataset(kind, data_files=[str(p) for p in paths], split="train")
        except Exception as e:  # a parse error deep inside pyarrow or pandas
            cause = e.__cause__ or e
            raise DataFileError(
                f"{', '.join(map(str, paths))} could not be read as {kind}: "
                f"{type(cause).__name__}: {str(cause)[:300]}",
                "check that the file is what its suffix says, and that each field has one "
                "type in every row (labels all strings, say, not 7 here and '7/2' there)",
            ) from None
    rows = ds.to_list()
    if not rows:
        raise DataFileError(f"{', '.join(map(str, paths))} hold no rows", "add rows")
    return rows
