"""A transparent offline judge for the P-SOUPS style dimensions (examples/psoups.py), no LLM.

The paper judges P-SOUPS answers with a strong LLM (PAPER.md, experiment 2). Here one number per dimension
stands in for it, each a published formula or lexicon that runs offline:
  P1 expertise    Flesch-Kincaid grade, 0.39 words/sentence + 11.8 syllables/word - 15.59 (Kincaid et al. 1975),
                  syllables from pyphen's hyphenation dictionary (hyphenation points + 1);
  P2 information  the number of words;
  P3 friendliness VADER's compound sentiment in [-1, 1] (Hutto & Gilbert 2014, a lexicon: no download).
Each profile (pole) wants its dimension's score low or high. A user prefers the answer that scores better
for them by at least the dimension's margin; closer pairs are near-ties, dropped from the training data.
"""
from __future__ import annotations

import re

import runs

try:
    import pyphen
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
except ImportError:  # example dependencies, never needed by the core files
    runs.fail("examples/judge.py needs vaderSentiment and pyphen: pip install vaderSentiment==3.3.2 pyphen==0.18.1")

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n\s*\n")  # a paragraph break ends a sentence too (lists, headings)
_HYPHENATOR = pyphen.Pyphen(lang="en_US")
_VADER = SentimentIntensityAnalyzer()


def syllables(word: str) -> int:
    """Syllables of one word: pyphen's hyphenation points + 1 (en_US; a one-syllable word has none)."""
    return len(_HYPHENATOR.positions(word.lower())) + 1


def reading_grade(text: str) -> float:
    """Flesch-Kincaid grade level: 0.39 (words / sentences) + 11.8 (syllables / words) - 15.59; 0 for no words.
    Text without a sentence end counts as one sentence."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    sentences = max(1, len(_SENTENCE_END.findall(text.strip())))
    return 0.39 * len(words) / sentences + 11.8 * sum(map(syllables, words)) / len(words) - 15.59


def information(text: str) -> float:
    """The amount of information, as the number of words."""
    return float(len(_WORD.findall(text)))


def friendliness(text: str) -> float:
    """VADER's compound sentiment of the text, from -1 (hostile) to +1 (warm)."""
    return _VADER.polarity_scores(text)["compound"]


# dimension -> (score, the margin below which two answers are a near-tie)
DIMENSIONS = {"P1": (reading_grade, 1.0), "P2": (information, 10.0), "P3": (friendliness, 0.2)}
# profile -> +1 if it wants its dimension's score high, -1 if low (P-SOUPS's six preference profiles)
PROFILES = {"P1A": -1, "P1B": +1, "P2A": -1, "P2B": +1, "P3A": +1, "P3B": -1}


def score(profile: str, text: str) -> float:
    """The profile's dimension score of `text` (grade, words or sentiment), unsigned."""
    return DIMENSIONS[profile[:2]][0](text)


def compare(profile: str, a: str, b: str, margin: float | None = None) -> int:
    """+1 if `profile` prefers a, -1 if b, 0 if their scores differ by less than `margin` (None: the
    dimension's own margin; 0: only equal scores tie)."""
    if margin is None:
        margin = DIMENSIONS[profile[:2]][1]
    diff = PROFILES[profile] * (score(profile, a) - score(profile, b))
    return 0 if abs(diff) < margin or diff == 0 else (1 if diff > 0 else -1)


def label(profile: str, a: str, b: str, margin: float | None = None) -> tuple[str, str] | None:
    """(chosen, rejected) for a user of `profile`, or None for a near-tie (dropped)."""
    c = compare(profile, a, b, margin)
    return None if c == 0 else ((a, b) if c > 0 else (b, a))


def win_rate(profile: str, ours: list[str], theirs: list[str]) -> float:
    """Share of answer pairs where `ours` scores better for `profile` than `theirs`; an equal score counts half."""
    return sum((compare(profile, a, b, margin=0) + 1) / 2 for a, b in zip(ours, theirs, strict=True)) / max(1, len(ours))
