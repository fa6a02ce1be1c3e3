"""Scores and continual-learning metrics (shared SMOLORA.md, "Metrics").

What it does: answer normalisation and exact-match accuracy (VQA-style), option-letter
parsing, CIDEr-D, the format check behind MIF, and the matrix metrics AP, MAP and BWT over
an accuracy matrix `a[t][i]` (score on task i after training task t; entries for tasks not
yet seen are None). What it does not do: generate answers (see `evaluate.py`).

Two scales. The *balanced* scale (what evaluation stores as a task's `score`) puts every task
on 0-100: accuracy in %, a caption task's CIDEr-D x 10 (CIDEr-D's 0-10 range, 10 = the
candidate equals every reference), so one caption task cannot outweigh the accuracy tasks.
The *paper* scale is how the paper prints and averages its table: accuracy in %, CIDEr-D
x 100 (Flickr30k 151.99). `AP`, `MAP` and `BWT` are the paper's (`continual_metrics`),
`AP_balanced`, `MAP_balanced` and `BWT_balanced` the same formulas on the balanced scale.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_PUNCT = re.compile(r"[^\w\s']")
_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?\.?$")
_LETTER_LEAD = re.compile(r"^\(?([A-Z])(?:\)|\.|:|$|\s)")


# --------------------------------------------------------------------------------------
# Per-answer scoring
# --------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, drop punctuation and articles, numbers as digits."""
    words = _PUNCT.sub(" ", text.lower().replace("'s", "")).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Normalised prediction equals a normalised reference."""
    p = normalize_answer(prediction)
    return any(p == normalize_answer(r) for r in references)


def parse_option_letter(prediction: str) -> str | None:
    """The option letter a prediction gives ("B", "B.", "(B)", "B. blue"), or None."""
    m = _LETTER_LEAD.match(prediction.strip())
    return m.group(1) if m else None


def follows_format(prediction: str, answer_format: str, references: Sequence[str] = ()) -> bool:
    """Whether an answer follows its instruction's format (the MIF check).

    Args:
        prediction: generated text.
        answer_format: "letter" (exactly one option letter), "short" (at most two words,
            or exactly a reference answer) or "caption" (one sentence ending in '.').
        references: the acceptable answers (for the "exact answer" case).

    Raises:
        ValueError: for an unknown format.
    """
    text = prediction.strip()
    if answer_format == "letter":
        return bool(_LETTER_ONLY.match(text))
    if answer_format == "short":
        return 0 < len(text.split()) <= 2 or (bool(text) and exact_match(text, references))
    if answer_format == "caption":
        return text.endswith(".") and not re.search(r"[.!?]", text[:-1]) and len(text.split()) >= 2
    raise ValueError(f"unknown answer format {answer_format!r}")


def score_answer(prediction: str, references: Sequence[str], answer_format: str) -> bool:
    """Correctness of one non-caption answer (letter tasks compare the parsed letter)."""
    if answer_format == "letter":
        letter = parse_option_letter(prediction)
        return letter is not None and any(letter == r.strip().rstrip(".") for r in references)
    return exact_match(prediction, references)


# --------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: list[str], n_max: int) -> Counter:
    return Counter(
        tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1)
    )


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n_max: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """CIDEr-D per candidate, as computed by the coco-caption reference implementation.

    TF-IDF n-gram vectors (n = 1..4; document frequency over the references of the corpus;
    idf = log(#images) - log(df)), clipped cosine similarity per n with a Gaussian length
    penalty (sigma 6), averaged over n and over references, times 10. Like the reference
    code, the "length" in the penalty counts bigrams. Tokenisation is lowercase words
    without punctuation (the reference uses the PTB tokenizer).

    Args:
        candidates: one generated caption per image.
        references: the reference captions of each image.

    Returns:
        One score per candidate (0 for an image with no references).
    """
    if len(candidates) != len(references):
        raise ValueError("one list of references per candidate is required")
    crefs = [[_ngrams(_tokens(r), n_max) for r in refs] for refs in references]
    ctest = [_ngrams(_tokens(c), n_max) for c in candidates]
    df: Counter = Counter()
    for refs in crefs:
        df.update({g for ref in refs for g in ref})
    log_n = math.log(float(max(1, len(crefs))))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n_max)]
        norm = [0.0] * n_max
        length = 0
        for g, tf in counts.items():
            n = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df[g])))
            v[n][g] = w
            norm[n] += w * w
            if n == 1:  # the reference implementation's length counts bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for test, refs in zip(ctest, crefs):
        if not refs:
            scores.append(0.0)
            continue
        vh, nh, lh = vec(test)
        total = [0.0] * n_max
        for ref in refs:
            vr, nr, lr = vec(ref)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for n in range(n_max):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        scores.append(10.0 * (sum(total) / n_max) / len(refs))
    return scores


# --------------------------------------------------------------------------------------
# Continual-learning metrics over a_{t,i}
# --------------------------------------------------------------------------------------
def _check_square(matrix: Matrix) -> int:
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError("the accuracy matrix must be T x T (None for tasks not yet seen)")
    for s, row in enumerate(matrix):
        if any(row[i] is None for i in range(s + 1)):
            raise ValueError(f"row {s} must score every task seen so far (0..{s})")
    return t


def average_performance(matrix: Matrix) -> float:
    """AP = mean_i a_{T,i}: the final model's mean score over all tasks."""
    t = _check_square(matrix)
    return sum(float(x) for x in matrix[t - 1]) / t  # type: ignore[arg-type]


def mean_average_performance(matrix: Matrix) -> float:
    """MAP = mean_t AP_t, with AP_t the mean over the tasks seen after stage t."""
    t = _check_square(matrix)
    return sum(sum(float(matrix[s][i]) for i in range(s + 1)) / (s + 1) for s in range(t)) / t  # type: ignore[arg-type]


def backward_transfer(matrix: Matrix) -> float:
    """BWT = mean_{i<T} (a_{T,i} - a_{i,i}); negative means forgetting (0 for T = 1)."""
    t = _check_square(matrix)
    if t == 1:
        return 0.0
    return sum(float(matrix[t - 1][i]) - float(matrix[i][i]) for i in range(t - 1)) / (t - 1)  # type: ignore[arg-type]


def mean_instruction_following(format_rates: Sequence[float]) -> float:
    """MIF = mean over tasks of the share (0-100) of answers that follow the format."""
    if not format_rates:
        raise ValueError("MIF needs at least one task")
    return sum(format_rates) / len(format_rates)


# --------------------------------------------------------------------------------------
# The paper's scale and the balanced one
# --------------------------------------------------------------------------------------
#: Balanced score = CIDEr-D x BALANCED_CIDER_SCALE (0-100 like an accuracy).
BALANCED_CIDER_SCALE = 10.0
#: Paper score = CIDEr-D x PAPER_CIDER_SCALE (the paper's Flickr30k column, e.g. 151.99).
PAPER_CIDER_SCALE = 100.0


def to_paper_scale(matrix: Matrix, caption_tasks: Sequence[bool]) -> list[list[float | None]]:
    """A balanced-scale matrix (or one row, as a 1 x T matrix) on the paper's scale.

    Args:
        matrix: rows of scores, caption columns as CIDEr-D x 10.
        caption_tasks: per column, whether it is a caption (CIDEr-D) task.

    Returns:
        The same matrix with caption columns as CIDEr-D x 100 (None entries kept).
    """
    factor = PAPER_CIDER_SCALE / BALANCED_CIDER_SCALE
    out = []
    for row in matrix:
        if len(row) != len(caption_tasks):
            raise ValueError("one caption flag per matrix column is required")
        out.append(
            [
                None if x is None else float(x) * (factor if cap else 1.0)
                for x, cap in zip(row, caption_tasks)
            ]
        )
    return out


def continual_metrics(matrix: Matrix, caption_tasks: Sequence[bool]) -> dict[str, float | None]:
    """AP / MAP / BWT on the paper's scale and on the balanced one.

    Args:
        matrix: a_{t,i} on the balanced scale (as evaluation stores it): T x T for a
            sequential method, or a single row for joint training (MAP and BWT undefined).
        caption_tasks: per task, whether it is scored by CIDEr-D.

    Returns:
        {"AP", "MAP", "BWT"} (paper scale) and {"AP_balanced", "MAP_balanced",
        "BWT_balanced"}; MAP and BWT are None for a single-row matrix over several tasks.
    """
    paper = to_paper_scale(matrix, caption_tasks)
    out: dict[str, float | None] = {}
    for suffix, mat in (("", paper), ("_balanced", [list(r) for r in matrix])):
        square = len(mat) == len(mat[-1])
        if square:
            out["AP" + suffix] = average_performance(mat)
            out["MAP" + suffix] = mean_average_performance(mat)
            out["BWT" + suffix] = backward_transfer(mat)
        else:
            last = [float(x) for x in mat[-1] if x is not None]
            out["AP" + suffix] = sum(last) / len(last)
            out["MAP" + suffix] = None
            out["BWT" + suffix] = None
    return out


def paper_scale_score(score: float, metric: str) -> float:
    """One balanced-scale task score on the paper's scale (`metric` "cider" or "accuracy")."""
    return score * (PAPER_CIDER_SCALE / BALANCED_CIDER_SCALE) if metric == "cider" else score
