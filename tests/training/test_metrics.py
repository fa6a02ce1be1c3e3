"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from smolora.training import metrics

MATRIX = [[80.0, None, None], [60.0, 90.0, None], [50.0, 70.0, 100.0]]


def test_ap_map_bwt_by_hand() -> None:
    assert metrics.average_performance(MATRIX) == pytest.approx((50 + 70 + 100) / 3)
    assert metrics.mean_average_performance(MATRIX) == pytest.approx(
        (80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3
    )
    assert metrics.backward_transfer(MATRIX) == pytest.approx(((50 - 80) + (70 - 90)) / 2)


def test_single_task_matrix_has_zero_bwt() -> None:
    assert metrics.backward_transfer([[42.0]]) == 0.0
    assert metrics.mean_average_performance([[42.0]]) == 42.0


def test_matrix_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        metrics.average_performance([[1.0, 2.0]])
    with pytest.raises(ValueError):
        metrics.backward_transfer([[1.0, None], [None, 2.0]])


def test_mif_is_mean_of_rates() -> None:
    assert metrics.mean_instruction_following([100.0, 50.0, 0.0]) == pytest.approx(50.0)


def test_normalisation_and_exact_match() -> None:
    assert metrics.normalize_answer("The Red.") == "red"
    assert metrics.normalize_answer("two") == "2"
    assert metrics.exact_match("Two", ["2"])
    assert not metrics.exact_match("red circle", ["red"])


@pytest.mark.parametrize(
    "pred,letter",
    [("B", "B"), ("B.", "B"), ("(C)", "C"), ("A. red", "A"), ("red", None), ("Blue", None)],
)
def test_option_letter_parsing(pred: str, letter: str | None) -> None:
    assert metrics.parse_option_letter(pred) == letter


@pytest.mark.parametrize(
    "pred,fmt,ok",
    [
        ("B", "letter", True),
        ("B.", "letter", True),
        ("B. blue", "letter", False),
        ("blue", "letter", False),
        ("red", "short", True),
        ("two circles", "short", True),
        ("This is a beach scene.", "short", False),
        ("A red circle on a beach.", "caption", True),
        ("A red circle on a beach", "caption", False),
        ("This is a beach scene. There is a red circle.", "caption", False),
    ],
)
def test_format_following(pred: str, fmt: str, ok: bool) -> None:
    assert metrics.follows_format(pred, fmt, ["red"]) is ok


def test_short_format_accepts_an_exact_longer_answer() -> None:
    assert metrics.follows_format("the red big circle", "short", ["the red big circle"])


def test_letter_scoring() -> None:
    assert metrics.score_answer("B.", ["B"], "letter")
    assert not metrics.score_answer("B", ["C"], "letter")
    assert not metrics.score_answer("blue", ["B"], "letter")


def test_cider_d_identical_two_word_captions() -> None:
    # Two images with disjoint n-grams: idf = log 2 for all. Identical 2-word captions
    # match perfectly on 1- and 2-grams; 3- and 4-grams are empty: 10 * (1 + 1 + 0 + 0) / 4.
    scores = metrics.cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert scores == pytest.approx([5.0, 5.0])


def test_cider_d_partial_match_by_hand() -> None:
    # Image 2: candidate "c" vs reference "c d". Unigram cosine = log2*log2 / (log2 * sqrt(2) log2)
    # = 1/sqrt(2); no bigrams in the candidate; length (bigrams) 0 vs 1 -> penalty exp(-1/72).
    scores = metrics.cider_d(["a b", "c"], [["a b"], ["c d"]])
    expected = 10.0 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert scores[1] == pytest.approx(expected, rel=1e-9)


def test_cider_d_long_identical_caption_scores_ten_and_disjoint_zero() -> None:
    refs = [["a red circle on a beach"], ["two blue stars in a forest"]]
    assert (
        metrics.cider_d(["a red circle on a beach"], refs[:1] * 1)[0] == 0.0
    )  # one image: idf is log(1) = 0
    scores = metrics.cider_d(["a red circle on a beach", "green squares at night"], refs)
    assert scores[0] == pytest.approx(10.0)
    assert scores[1] == 0.0


def test_cider_d_averages_over_references() -> None:
    refs = [["a red circle on a beach", "one red circle on sand"], ["two blue stars in a forest"]]
    s = metrics.cider_d(["a red circle on a beach", "two blue stars in a forest"], refs)
    assert 0 < s[0] < 10.0
    assert s[1] == pytest.approx(10.0)
