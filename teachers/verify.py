"""Rule-based rewards as in DeepSeek-R1: accuracy (final answer matches the gold one) and format.

Extraction order, on the text after `</think>` when the model closed its reasoning (the answer is
there; numbers inside the reasoning are intermediate), falling back to the whole text:
  1. GSM8K `#### n` (last one)
  2. `\\boxed{...}` (last one, nested braces allowed)
  3. "The answer is n" / "answer: n" (last one)
  4. the last number in the text.
Comparison is numeric when both sides parse as numbers (commas, currency, percent, units and
trailing dots stripped; fractions and decimals compared exactly: 3.0 == 3, 1/2 == 0.5), else by
`math_verify` when installed (LaTeX answers), else as normalised strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# a number: thousands-grouped or plain digits, optional decimals, optional /denominator; a minus sign
# only when it is not a hyphen between two numbers ("3-5" is not -5)
_NUM = r"(?:(?<![\d)])-\s?)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?"
_NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
        j += 1
    return None  # unbalanced: the model stopped mid-answer


def _answer_in_phrase(phrase: str) -> str | None:
    """The answer stated after 'the answer is': its first number, else the phrase up to a period."""
    boxed = _boxed(phrase)
    if boxed is not None:
        return boxed
    match = _NUM_RE.search(phrase)
    if match:
        return match.group(0).strip()
    phrase = phrase.strip().rstrip(".").strip()
    return phrase or None


def _extract(text: str) -> str | None:
    hashes = _HASH_RE.findall(text)
    if hashes:
        found = _answer_in_phrase(hashes[-1])
        if found:
            return found
    boxed = _boxed(text)
    if boxed:
        return boxed
    answers = _ANSWER_RE.findall(text)
    for phrase in reversed(answers):
        found = _answer_in_phrase(phrase)
        if found:
            return found
    numbers = _NUM_RE.findall(text)
    if numbers:
        return numbers[-1].strip()
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer stated in a completion, or None when it states none."""
    if not text:
        return None
    if THINK_CLOSE in text:
        after = text.rsplit(THINK_CLOSE, 1)[1]
        found = _extract(after)
        if found is not None:
            return found
    return _extract(text)


_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


def parse_number(value: str | None) -> Fraction | None:
    """`value` as an exact number, or None when it is not one number (possibly with a unit)."""
    if value is None:
        return None
    s = str(value).strip()
    s = _TEXT_CMD.sub(r" \1", s)
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\ ", "€", "£", "¥", "{", "}", "\\left", "\\right"):
        s = s.replace(junk, " " if junk.startswith("\\") and junk != "\\$" else "")
    s = s.replace("−", "-").strip()
    s = re.sub(r"^[=:~≈]+", "", s).strip()
    s = s.rstrip(".").strip()
    m = re.fullmatch(r"\(?\s*(-?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\s?\.\d+)\s*\)?"
                     r"(?:\s*/\s*\(?\s*(\d+(?:\.\d+)?)\s*\)?)?"
                     r"(\s*[A-Za-z][A-Za-z .'/-]*)?", s)
    if not m:
        return None
    try:
        number = Fraction(m.group(1).replace(",", "").replace(" ", ""))
        if m.group(2):
            denominator = Fraction(m.group(2))
            if denominator == 0:
                return None
            number /= denominator
    except (ValueError, ZeroDivisionError):
        return None
    return number


def _normalise_text(value: str) -> str:
    s = _TEXT_CMD.sub(r"\1", str(value))
    s = s.replace("\\left", "").replace("\\right", "").replace("$", "")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _math_verify(pred: str, gold: str) -> bool | None:
    try:
        import math_verify
    except ImportError:
        return None
    try:
        gold_parsed = math_verify.parse(gold if "$" in gold or "\\" in gold else f"${gold}$")
        pred_parsed = math_verify.parse(pred if "$" in pred or "\\" in pred else f"${pred}$")
        if not gold_parsed or not pred_parsed:
            return None
        return bool(math_verify.verify(gold_parsed, pred_parsed))
    except Exception:  # math_verify raises on odd input; fall back to string comparison
        return None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when `pred` states the same answer as `gold` (a number, or a GSM8K solution with ####)."""
    if pred is None or gold is None:
        return False
    gold = str(gold)
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    pred_num, gold_num = parse_number(pred), parse_number(gold)
    if pred_num is not None and gold_num is not None:
        return pred_num == gold_num
    verified = _math_verify(str(pred), gold)
    if verified is not None:
        return verified
    return _normalise_text(pred) == _normalise_text(gold) and bool(_normalise_text(gold))


def format_ok(text: str | None) -> bool:
    """Exactly one `<think>...</think>` block, first in the text, non-empty, then a non-empty answer."""
    if not text or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    before, rest = text.split(THINK_OPEN, 1)
    if THINK_CLOSE not in rest:  # closed before it was opened
        return False
    thinking, answer = rest.split(THINK_CLOSE, 1)
    return not before.strip() and bool(thinking.strip()) and bool(answer.strip())


def is_correct(completion: str | None, gold: str | None) -> bool:
    """Does `completion` state the gold answer? (the accuracy reward; STaR and GRPO decide by it)"""
    return answers_match(extract_answer(completion), gold)


def reward(text: str | None, gold: str | None) -> dict:
    """R1-style rule rewards: {"accuracy": 0/1, "format": 0/1}."""
    return {"accuracy": float(answers_match(extract_answer(text), gold)), "format": float(format_ok(text))}
