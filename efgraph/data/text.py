"""(source text, target text) pairs from JSONL, CSV or TSV files, and their embeddings.

File formats (chosen by extension, or by ``file_format=``):

``.jsonl`` / ``.ndjson``
    One JSON object per line, e.g. ``{"source": "...", "target": "..."}``. Blank lines are
    skipped.
``.csv``
    A header row naming the columns, then one record per row; standard CSV quoting (a quoted
    field may contain commas, quotes as ``""`` and newlines).
``.tsv``
    A header row, then one record per line, fields separated by tabs, *no* quoting (quotes are
    literal text, as in most TSV exports). Blank lines are skipped.

Every error is a :class:`ValueError` of the form ``"<file>:<line>: <problem>"`` with the 1-based
line number where the bad record starts.

Groups: a split must not put rows that share a source text on both sides (a small entailment
set had 120 of 838 rows sharing their premise with another row, so the test part held sources the
model was trained on). ``scripts/train.py`` (``dataset: text``) therefore groups by the file's
``group`` column when it has one, and by the source text otherwise (``group_by_source``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from efgraph.data.embed import ModelSpec, embed_texts
from efgraph.data.pairs import EmbeddingPairs

#: The column / JSON field that ``dataset: text`` groups by when a file has it.
TEXT_GROUP_FIELD = "group"

#: Extension -> format name understood by :func:`read_text_pairs`.
TEXT_FORMATS: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                                ".tsv": "tsv"}


@dataclass(frozen=True)
class TextPairs:
    """Parallel texts read from a file; all lists have the same length ``N >= 1``.

    Attributes:
        sources: source texts.
        targets: target texts.
        keys: unique id per pair: the ``key_field`` value, else ``"<file name>:<line>"``.
        groups: the ``group_field`` values, or None when no group field was requested.
    """

    sources: list[str]
    targets: list[str]
    keys: list[str]
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.sources)


def read_text_pairs(
    path: str | os.PathLike[str],
    *,
    source_field: str = "source",
    target_field: str = "target",
    key_field: str | None = None,
    group_field: str | None = None,
    file_format: str | None = None,
    group_by_source: bool = False,
) -> TextPairs:
    """Read text pairs from a JSONL, CSV or TSV file (see the module docstring).

    Args:
        path: the file.
        source_field, target_field: names of the JSON fields / header columns holding the texts.
        key_field: optional field with a unique id per pair (default ids: ``"<file>:<line>"``).
        group_field: optional field with a group name per pair (used for group-wise splits).
        file_format: ``"jsonl"``, ``"csv"`` or ``"tsv"``; default: from the extension.
        group_by_source: without ``group_field``, group the pairs by their source text, so that
            a group-wise split keeps every row of one source on one side.
    Raises:
        ValueError: unknown format, malformed record, missing field, empty or non-string text,
            duplicate key, or no records at all; the message names the file and line.
    """
    path = Path(path)
    fmt = file_format or TEXT_FORMATS.get(path.suffix.lower())
    if fmt not in ("jsonl", "csv", "tsv"):
        raise ValueError(
            f"{path}: unknown text pair format {file_format or path.suffix or '(none)'!r}; "
            f"supported extensions: {', '.join(TEXT_FORMATS)} (or file_format='jsonl'|'csv'|'tsv')"
        )
    fields = {"source": source_field, "target": target_field}
    if key_field is not None:
        fields["key"] = key_field
    if group_field is not None:
        fields["group"] = group_field
    records = _jsonl_records(path, fields) if fmt == "jsonl" else _delimited_records(
        path, fields, delimiter="," if fmt == "csv" else "\t")

    sources: list[str] = []
    targets: list[str] = []
    keys: list[str] = []
    groups: list[str] = []
    first_line_of_key: dict[str, int] = {}
    for line, record in records:
        for role, name in fields.items():
            value = record[role]
            if not isinstance(value, str):
                raise ValueError(f"{path}:{line}: field {name!r} must be a string, got "
                                 f"{type(value).__name__}")
            if role in ("source", "target", "key") and not value.strip():
                raise ValueError(f"{path}:{line}: field {name!r} is empty")
        key = record["key"] if key_field is not None else f"{path.name}:{line}"
        if key in first_line_of_key:
            raise ValueError(f"{path}:{line}: duplicate key {key!r} (first seen on line "
                             f"{first_line_of_key[key]})")
        first_line_of_key[key] = line
        sources.append(record["source"])
        targets.append(record["target"])
        keys.append(key)
        if group_field is not None:
            groups.append(record["group"])
    if not sources:
        raise ValueError(f"{path}: no text pairs found (empty file?)")
    if group_field is None and group_by_source:
        groups = list(sources)
    return TextPairs(sources, targets, keys, groups if group_field is not None or group_by_source else None)


def text_file_has_field(path: str | os.PathLike[str], name: str, file_format: str | None = None) -> bool:
    """Whether the pair file has column / field ``name`` (its header, or its first JSON record)."""
    path = Path(path)
    fmt = file_format or TEXT_FORMATS.get(path.suffix.lower())
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        return False  # read_text_pairs reports it with the line
                    return isinstance(obj, dict) and name in obj
            return False
        if fmt in ("csv", "tsv"):
            header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])
            return name in [h.strip() for h in header]
    return False


def load_text_pairs(
    path: str | os.PathLike[str],
    *,
    source_field: str = "source",
    target_field: str = "target",
    key_field: str | None = None,
    group_field: str | None = None,
    file_format: str | None = None,
    group_by_source: bool = False,
    model: ModelSpec = None,
    target_model: ModelSpec = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> EmbeddingPairs:
    """Read a text pair file (:func:`read_text_pairs`) and embed both sides (:func:`embed_texts`).

    Args:
        model: model for the source texts (None: packaged all-MiniLM-L6-v2).
        target_model: model for the target texts; None means the same as ``model``. A different
            model gives ``D_tgt != D_src``.
        Other arguments: as in :func:`read_text_pairs` and :func:`embed_texts`.
    Returns:
        :class:`EmbeddingPairs` with unit-norm ``src [N, D_src]``, ``tgt [N, D_tgt]``, the
        record keys and (if ``group_field`` is given) groups.
    """
    texts = read_text_pairs(path, source_field=source_field, target_field=target_field,
                            key_field=key_field, group_field=group_field,
                            file_format=file_format, group_by_source=group_by_source)
    src, tgt = (
        embed_texts(side, side_model, cache_dir=cache_dir, use_cache=use_cache,
                    batch_size=batch_size, progress=progress)
        for side, side_model in ((texts.sources, model),
                                 (texts.targets, target_model if target_model is not None
                                  else model))
    )
    return EmbeddingPairs(src=src, tgt=tgt, keys=texts.keys, groups=texts.groups)


# --- record readers: yield (line number, {role: value}) ------------------------------------------


def _jsonl_records(path: Path, fields: dict[str, str]) -> Iterator[tuple[int, dict[str, object]]]:
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON: {e.msg} "
                                 f"(column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(obj).__name__}")
            missing = [name for name in fields.values() if name not in obj]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) "
                                 f"{', '.join(map(repr, missing))}; found {sorted(obj)}")
            yield line_no, {role: obj[name] for role, name in fields.items()}


def _delimited_records(
    path: Path, fields: dict[str, str], *, delimiter: str
) -> Iterator[tuple[int, dict[str, object]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    if delimiter == "\t":
        # TSV: no quoting, so quotes stay literal text.
        reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE,
                            strict=True)
    else:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    kind = "TSV" if delimiter == "\t" else "CSV"
    header: list[str] | None = None
    columns: dict[str, int] = {}
    prev_line = 0
    while True:
        start_line = prev_line + 1  # a record starts on the line after the previous one ended
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed {kind}: {e}") from e
        prev_line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if header is None:
            header = [h.strip() for h in row]
            missing = [name for name in fields.values() if name not in header]
            if missing:
                raise ValueError(f"{path}:{start_line}: header lacks column(s) "
                                 f"{', '.join(map(repr, missing))}; found {header}")
            columns = {role: header.index(name) for role, name in fields.items()}
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{start_line}: expected {len(header)} {kind} fields "
                             f"(as in the header), found {len(row)}")
        yield start_line, {role: row[i] for role, i in columns.items()}
    if header is None:
        raise ValueError(f"{path}: empty {kind} file: no header row")
