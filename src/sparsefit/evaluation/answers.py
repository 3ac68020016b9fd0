"""GSM8K answer extraction and scoring, exactly as lm-evaluation-harness's `gsm8k` task does it.

Two filters over each generation: "strict-match" takes the first `#### N`; "flexible-extract"
takes the last number-like token. Both prediction and reference then go through the metric's
`regexes_to_ignore` (commas, `$`, everything up to `#### `, a trailing period) and are
compared case-insensitively.
"""

from __future__ import annotations

import math
import re

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"  # the harness's fallback when a filter finds nothing


def _regex_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):  # several groups: the first that matched
        match = next((m for m in match if m), INVALID)
    return match.strip()


def extract_strict(generation: str) -> str:
    """The first `#### N` of a generation (harness filter "strict-match")."""
    return _regex_filter(STRICT, generation, 0)


def extract_flexible(generation: str) -> str:
    """The last number in a generation (harness filter "flexible-extract")."""
    return _regex_filter(FLEXIBLE, generation, -1)


def normalize(text: str) -> str:
    """The harness's exact_match preprocessing: drop the ignored patterns, lower-case."""
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def reference_answer(answer: str) -> str:
    """The number a GSM8K reference answer ends with (`... #### 72` -> `72`)."""
    return normalize(answer)


def is_correct(extracted: str, answer: str) -> bool:
    return normalize(extracted) == reference_answer(answer)


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample variance (n - 1), as the harness reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
