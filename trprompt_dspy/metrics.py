"""Answer extraction and equivalence for GSM8K, GSM-Hard, SVAMP and MATH.

Everything here reads model output, so nothing here evaluates it: numbers are parsed with
regular expressions and ``float``/``Fraction``; LaTeX goes through math-verify's LaTeX parser
(latex2sympy, a grammar parser) and never through ``eval``, ``sympify`` or ``parse_expr``
(math-verify's plain-expression extractor uses ``parse_expr``, so it is not enabled).

math-verify bounds its work with ``signal.alarm``, which only works in a main thread. DSPy runs
metrics in worker threads, so LaTeX comparisons run in a small worker process whose main thread
owns the alarm; a comparison that still overruns is abandoned, the worker is replaced and the
verdict is ``False``.

Every public function here returns a verdict (or ``None`` for "no answer found") for any input
and never raises on model output.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import math
import multiprocessing
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: Longest piece of model output that is scanned for an answer. Answers sit at the end of a
#: reply; scanning only the tail bounds the work on runaway generations.
MAX_SCAN_CHARS = 4000
#: Longest answer string handed to the LaTeX parser.
MAX_LATEX_CHARS = 600
#: Longest run of digits accepted as a number (float() of more is pointless and slow).
MAX_NUMBER_DIGITS = 400
#: Seconds math-verify may spend on one parse or comparison, and extra slack for the worker.
LATEX_TIMEOUT_S = 3
_WORKER_SLACK_S = 5

_NUMBER_RE = re.compile(r"[-−]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_HASH_ANSWER_RE = re.compile(r"####\s*([^\n]{0,200})")
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|answer)\s*(?:is|=|:)\s*[:\s]*([^\n]{0,200})", re.IGNORECASE
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]{0,100})\}")
_FRAC_RE = re.compile(r"^\\[dt]?frac\{(-?\d{1,50})\}\{(-?\d{1,50})\}$")
_SLASH_FRAC_RE = re.compile(r"^(-?\d{1,50})\s*/\s*(\d{1,50})$")


# --------------------------------------------------------------------------- extraction

def last_braced(text: str, command: str) -> str | None:
    """Content of the last ``\\command{...}`` in ``text`` with balanced braces, or None."""
    start = text.rfind(command + "{")
    while start != -1:
        i = start + len(command) + 1
        depth = 1
        j = i
        while j < len(text):
            ch = text[j]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
            j += 1
        # unbalanced: try an earlier occurrence
        start = text.rfind(command + "{", 0, start)
    return None


def extract_answer(text: Any) -> str | None:
    """Find the final answer in free text.

    In order of preference: the last ``\\boxed{...}`` (or ``\\fbox{...}``), the text after the
    last ``####``, the text after the last "the answer is"/"answer:", otherwise the whole (short)
    text itself, which is what a solver's dedicated ``answer`` field holds. Returns ``None`` when
    there is nothing to compare (empty or non-text input).
    """
    if text is None:
        return None
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return None if isinstance(text, float) and not math.isfinite(text) else repr(text)
    if not isinstance(text, str):
        return None
    text = text[-MAX_SCAN_CHARS:].strip()
    if not text:
        return None
    for command in ("\\boxed", "\\fbox"):
        boxed = last_braced(text, command)
        if boxed is not None and boxed.strip():
            return boxed.strip()
    hashes = _HASH_ANSWER_RE.findall(text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    said = _ANSWER_IS_RE.findall(text)
    if said and said[-1].strip():
        return said[-1].strip().rstrip(".").strip()
    return text


# --------------------------------------------------------------------------- numbers

def _clean_numeric_text(s: str) -> str:
    s = _TEXT_CMD_RE.sub(r"\1", s)
    for token in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\ ", "\\left", "\\right"):
        s = s.replace(token, "")
    return s.replace("−", "-").strip().strip(".").strip()


def parse_number(text: Any) -> float | None:
    """Parse a numeric answer: ``"1,234"``, ``"$42.0"``, ``"-5 apples"``, ``"\\frac{1}{2}"``,
    ``"3/4"``, ``"50%"`` (read as 50). The last number in the text wins when there is prose.
    Returns None when there is no number or it is not finite.
    """
    answer = extract_answer(text)
    if answer is None:
        return None
    s = _clean_numeric_text(answer)
    compact = s.replace(" ", "")
    for pattern in (_FRAC_RE, _SLASH_FRAC_RE):
        m = pattern.match(compact)
        if m:
            num, den = int(m.group(1)), int(m.group(2))
            return None if den == 0 else float(Fraction(num, den))
    matches = _NUMBER_RE.findall(s)
    return _token_number(matches[-1]) if matches else None


def _token_number(token: str) -> float | None:
    """A number matched by ``_NUMBER_RE`` as a finite float, or None (too many digits, not finite)."""
    token = token.replace(",", "").replace("−", "-")
    if sum(c.isdigit() for c in token) > MAX_NUMBER_DIGITS:
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_equal(
    pred: Any, gold: Any, *, rel_tol: float = 1e-12, abs_tol: float = 1e-9, accept_rounded: bool = False
) -> bool:
    """True when both sides parse as numbers that agree within the tolerances (default: equal up
    to float noise, so ``42.0 == 42`` but an off-by-one on a large number is wrong).

    With ``accept_rounded``, a prediction given with d >= 2 decimals is also right when it equals
    the gold answer rounded to d decimals (``14053029.67`` for ``14053029.6666667``).
    """
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return False
    if math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol):
        return True
    if accept_rounded:
        decimals = _decimals_given(pred)
        if decimals >= 2:
            return math.isclose(a, round(b, decimals), rel_tol=1e-12, abs_tol=10.0 ** -(decimals + 3))
    return False


def numbers_in(text: Any) -> list[float]:
    """Every number written in ``text`` (``1,234``, ``-5``, ``0.5``; the first
    :data:`MAX_SCAN_CHARS` characters), as floats; never raises."""
    values = (_token_number(token) for token in _NUMBER_RE.findall(str(text or "")[:MAX_SCAN_CHARS]))
    return [value for value in values if value is not None]


def answer_in_text(text: Any, gold: Any, question: Any = None) -> bool:
    """Whether ``text`` (a prompt, a reward) gives away the gold answer: the gold answer's number
    is written in it, and is not one of the question's own numbers (a prompt that restates the
    question reveals nothing). A gold answer that is not a number is never found (False)."""
    value = parse_number(gold)
    if value is None:
        return False
    if question is not None and any(math.isclose(value, q, rel_tol=1e-9, abs_tol=1e-9) for q in numbers_in(question)):
        return False
    return any(math.isclose(value, n, rel_tol=1e-9, abs_tol=1e-9) for n in numbers_in(text))


def _decimals_given(text: Any) -> int:
    answer = extract_answer(text)
    matches = _NUMBER_RE.findall(_clean_numeric_text(answer)) if answer else []
    if not matches or "." not in matches[-1]:
        return 0
    return len(matches[-1].rsplit(".", 1)[1])


# --------------------------------------------------------------------------- LaTeX (MATH)

def _verify_in_worker(gold: str, pred: str, timeout_s: int) -> bool:
    """Runs in the worker process's main thread, where math-verify's alarms work."""
    from math_verify import LatexExtractionConfig, parse, verify

    def as_latex(s: str) -> str:
        return s if ("$" in s or "\\boxed" in s) else f"${s}$"

    config = [LatexExtractionConfig()]
    gold_parsed = parse(as_latex(gold), extraction_config=config, parsing_timeout=timeout_s)
    pred_parsed = parse(as_latex(pred), extraction_config=config, parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


class _LatexVerifier:
    """A lazily started single-process pool; replaced when a comparison overruns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # forkserver: forking a process that runs vLLM/litellm threads can deadlock.
                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
                self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method))
            return self._pool

    def _discard(self, pool: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, gold: str, pred: str, timeout_s: int) -> bool:
        pool = self._get_pool()
        try:
            future = pool.submit(_verify_in_worker, gold, pred, timeout_s)
            # two parses and one comparison, each bounded by timeout_s inside the worker
            return bool(future.result(timeout=3 * timeout_s + _WORKER_SLACK_S))
        except cf.TimeoutError:
            logger.warning("LaTeX comparison overran %ss; verdict False, worker replaced", timeout_s)
            self._discard(pool)
            return False
        except cf.process.BrokenProcessPool:
            logger.warning("LaTeX comparison worker died; verdict False, worker replaced")
            self._discard(pool)
            return False
        except Exception as exc:  # math-verify failures on hostile input are a "no"
            logger.debug("LaTeX comparison failed: %r", exc)
            return False

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_latex_verifier = _LatexVerifier()
atexit.register(_latex_verifier.close)


def _normalize_latex_string(s: str) -> str:
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_CMD_RE.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "$", " "):
        s = s.replace(token, "")
    return s.rstrip(".")


def latex_equal(pred: Any, gold: Any, *, timeout_s: int = LATEX_TIMEOUT_S) -> bool:
    """MATH-style equivalence: identical after light normalisation, equal as numbers, or
    equivalent according to math-verify (fractions, ``\\dfrac``, intervals, sets, ``\\sqrt``...).
    """
    p, g = extract_answer(pred), extract_answer(gold)
    if p is None or g is None:
        return False
    if _normalize_latex_string(p) == _normalize_latex_string(g):
        return True
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None and gn is not None and _looks_numeric(p) and _looks_numeric(g):
        return math.isclose(pn, gn, rel_tol=1e-9, abs_tol=1e-9)
    if len(p) > MAX_LATEX_CHARS or len(g) > MAX_LATEX_CHARS:
        return False
    return _latex_verifier(g, p, timeout_s)


def _looks_numeric(s: str) -> bool:
    """True when the whole answer is one number (possibly a simple fraction), not an expression."""
    compact = _clean_numeric_text(s).replace(" ", "").replace(",", "")
    return bool(
        _FRAC_RE.match(compact)
        or _SLASH_FRAC_RE.match(compact)
        or re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)", compact)
    )


# --------------------------------------------------------------------------- DSPy metrics

def _predicted_answer(prediction: Any) -> Any:
    if prediction is None:
        return None
    if isinstance(prediction, str):
        return prediction
    try:
        return prediction.answer
    except (AttributeError, KeyError):
        return None


def _gold_answer(example: Any) -> Any:
    try:
        return example.answer
    except (AttributeError, KeyError):
        return example.get("answer") if isinstance(example, dict) else None


@dataclass(frozen=True)
class AnswerMetric:
    """A DSPy metric ``metric(example, prediction, trace=None) -> bool`` comparing
    ``prediction.answer`` with ``example.answer``.

    ``kind`` is ``"numeric"`` (GSM8K, SVAMP: equal numbers), ``"numeric_tolerant"`` (GSM-Hard,
    whose gold answers are computed floats such as ``14053029.6666667``: a prediction rounded to
    two or more decimals also counts) or ``"latex"`` (MATH: math-verify equivalence).
    """

    kind: str = "numeric"
    rel_tol: float = 1e-12

    def __post_init__(self) -> None:
        if self.kind not in ("numeric", "numeric_tolerant", "latex"):
            raise ValueError(f"unknown metric kind {self.kind!r}; use numeric, numeric_tolerant or latex")

    @property
    def __name__(self) -> str:  # dspy.Evaluate and reports name metrics by __name__
        return f"{self.kind}_answer_match"

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> bool:
        pred, gold = _predicted_answer(prediction), _gold_answer(example)
        if self.kind == "latex":
            return latex_equal(pred, gold)
        return numbers_equal(pred, gold, rel_tol=self.rel_tol, accept_rounded=self.kind == "numeric_tolerant")


gsm8k_metric = AnswerMetric("numeric")
svamp_metric = AnswerMetric("numeric")
#: GSM-Hard answers are computed floats; a prediction rounded to >= 2 decimals also counts.
gsm_hard_metric = AnswerMetric("numeric_tolerant")
math_metric = AnswerMetric("latex")

METRICS: dict[str, Callable[..., bool]] = {
    "gsm8k": gsm8k_metric,
    "svamp": svamp_metric,
    "gsm_hard": gsm_hard_metric,
    "math": math_metric,
    "math500": math_metric,
    "words": gsm8k_metric,  # integer answers, like GSM8K
}


def metric_for(dataset: str) -> Callable[..., bool]:
    """The default metric for a dataset name (see ``trprompt_dspy.data.DATASETS``)."""
    try:
        return METRICS[dataset]
    except KeyError:
        raise ValueError(f"no default metric for dataset {dataset!r}; known: {', '.join(sorted(METRICS))}") from None
