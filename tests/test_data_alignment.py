"""The text-level alignment score on hand-made parallel texts (no Bible package needed)."""

from __future__ import annotations

import pytest

from efgraph.data.alignment import alignment_report, word_overlap

# 60 "sentences" with distinct vocabularies; the target is a light paraphrase of the source.
_WORDS = [f"w{k}" for k in range(600)]
SOURCES = [" ".join(_WORDS[10 * i: 10 * i + 10]) for i in range(60)]
TARGETS = [" ".join(_WORDS[10 * i + 2: 10 * i + 10] + ["the", "and"]) for i in range(60)]


def test_word_overlap():
    assert word_overlap("The cat sat", "the CAT sat.") == 1.0
    assert word_overlap("a b", "c d") == 0.0
    assert word_overlap("a b c", "a b d") == pytest.approx(2 / 4)
    assert word_overlap("", "a") == 0.0


def test_aligned_texts_win_everywhere():
    report = alignment_report(SOURCES, TARGETS, ["A"] * 30 + ["B"] * 30)
    assert report.win_rate == 1.0 and report.worst_window_win_rate == 1.0
    assert report.is_aligned()
    assert [g.group for g in report.groups] == ["A", "B"] and report.groups[0].n == 30
    assert report.misaligned_groups() == []


def test_drift_in_the_second_half_is_located_by_the_worst_window():
    # Rows 0-34 aligned, rows 35-59 shifted by one (like BBE from Genesis 43 on).
    targets = TARGETS[:35] + TARGETS[36:] + TARGETS[35:36]
    groups = ["A"] * 30 + ["B"] * 30
    report = alignment_report(SOURCES, targets, groups)
    assert report.window == 25
    assert report.worst_window_start >= 34
    assert report.worst_window_win_rate < 0.1
    assert not report.is_aligned()
    # Whole-group averages hide part of it: A is clean, only B is flagged.
    assert report.misaligned_groups() == ["B"]


def test_window_is_clipped_to_short_inputs_and_inputs_are_checked():
    report = alignment_report(SOURCES[:5], TARGETS[:5])
    assert report.window == 5 and report.is_aligned()
    with pytest.raises(ValueError, match="at least 2 rows"):
        alignment_report(SOURCES[:1], TARGETS[:1])
    with pytest.raises(ValueError, match="3 source texts but 2 target texts"):
        alignment_report(SOURCES[:3], TARGETS[:2])
