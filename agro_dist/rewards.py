"""Verifiable rewards: answer extraction, equivalence checking, and a time-limited scorer.

- ``extract_answer(text)``: the text after the last "The final answer is" (the paper's
  format), else the content of the last ``\\boxed{...}``; ``None`` if neither is there.
- ``math_equal(pred, ref)``: equivalence through ``math-verify``'s LaTeX parser (ANTLR into
  SymPy objects). Only the LaTeX path is used: math-verify's plain-expression path calls SymPy's
  ``parse_expr``, which runs ``eval`` on its input, and model output must never reach ``eval``.
- ``numeric_equal(pred, ref)``: numbers only (thousands commas stripped, ``$``, ``%`` and units
  after the number ignored), for arithmetic and GSM8K.
- ``RewardScorer``: runs a reward function in worker subprocesses with a per-call time limit
  (SymPy can hang on adversarial input such as huge exponents): a call that raises or times out
  scores 0 and is counted; a timed-out worker is killed and replaced. Reward functions are
  named (``"math"``, ``"numeric"``) or given by import path (``"package.module:function"``,
  called as ``fn(completion_text, reference_answer, metadata) -> float``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Optional, Sequence

log = logging.getLogger("agro_dist.rewards")

_FINAL = re.compile(r"the final answer is\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def extract_answer(text: str) -> Optional[str]:
    """The answer a completion commits to, or None."""
    matches = list(_FINAL.finditer(text))
    if matches:
        ans = text[matches[-1].end():].strip()
        ans = ans.split("\n", 1)[0].strip()
        boxed = _last_boxed(ans)
        if boxed is not None:
            return boxed
        ans = re.sub(r"[.\s]+$", "", ans)  # the sentence's full stop, then $...$ around it
        ans = ans.strip().strip("$").strip()
        return ans or None
    return _last_boxed(text)


def _strip_latex_wrappers(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\(|\\\)$", "", s).strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\left", "").replace("\\right", "")
    return s


def math_equal(pred: Optional[str], ref: str) -> bool:
    """Equivalence of two answers through the LaTeX parser of math-verify (never ``eval``)."""
    if pred is None:
        return False
    from math_verify import LatexExtractionConfig, parse, verify

    p, r = _strip_latex_wrappers(pred), _strip_latex_wrappers(ref)
    if p == r:
        return True
    # The LaTeX path only: math-verify's expression path would call sympy.parse_expr (eval).
    cfg = [LatexExtractionConfig(boxed_match_priority=0)]
    gold = parse(f"${r}$", extraction_config=cfg, parsing_timeout=None)
    guess = parse(f"${p}$", extraction_config=cfg, parsing_timeout=None)
    if not gold or not guess:
        return False
    return bool(verify(gold, guess, timeout_seconds=None))


def _to_number(s: Optional[str]) -> Optional[Decimal]:
    if s is None:
        return None
    m = _NUMBER.findall(s.replace("\\!", "").replace("{,}", ","))
    if not m:
        return None
    try:
        return Decimal(m[-1].replace(",", ""))
    except InvalidOperation:
        return None


def numeric_equal(pred: Optional[str], ref: str) -> bool:
    a, b = _to_number(pred), _to_number(ref)
    return a is not None and b is not None and a == b


def math_reward(text: str, reference: str, metadata: Optional[dict] = None) -> float:
    return float(math_equal(extract_answer(text), reference))


def numeric_reward(text: str, reference: str, metadata: Optional[dict] = None) -> float:
    """Numeric answers (arithmetic, GSM8K): the committed answer, else the last number written."""
    ans = extract_answer(text)
    if ans is None:
        nums = _NUMBER.findall(text)
        ans = nums[-1] if nums else None
    return float(numeric_equal(ans, reference))


BUILTIN = {"math": math_reward, "numeric": numeric_reward}


def resolve_reward_fn(spec: str) -> Callable[..., float]:
    """``"math"``, ``"numeric"``, or ``"package.module:function"``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


# --------------------------------------------------------------------------- the scorer


@dataclass
class ScorerStats:
    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    seconds: float = 0.0
    last_errors: List[str] = field(default_factory=list)


class RewardScorer:
    """Scores completions in worker processes, each call limited to ``timeout_s``.

    Workers are plain subprocesses (``python -m agro_dist.reward_worker``) speaking JSON lines:
    they start once, never import the caller's ``__main__`` (so scripts need no main guard), and a
    worker whose call times out (or dies) is killed and replaced (~1 s).
    """

    def __init__(self, reward_fn: str = "math", *, timeout_s: float = 5.0, workers: int = 1):
        resolve_reward_fn(reward_fn)  # fail early, in the caller's process, on a bad name
        self.spec = reward_fn
        self.timeout_s = timeout_s
        self.stats = ScorerStats()
        self._workers = [self._start() for _ in range(max(1, workers))]

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])  # user functions importable as here
        return subprocess.Popen([sys.executable, "-m", "agro_dist.reward_worker", self.spec], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1, env=env)

    def _restart(self, i: int) -> None:
        p = self._workers[i]
        p.kill()
        p.wait(5)
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._workers[i] = self._start()

    def score(self, texts: Sequence[str], reference: str, metadata: Optional[Dict[str, Any]] = None) -> List[float]:
        """One reward per text; 0.0 for a call that raised, returned non-finite or timed out."""
        out: List[float] = [0.0] * len(texts)
        pending = list(range(len(texts)))
        t0 = time.perf_counter()
        meta = metadata or {}
        while pending:
            batch = []
            for w in range(len(self._workers)):
                if not pending:
                    break
                i = pending.pop(0)
                try:
                    self._workers[w].stdin.write(json.dumps([texts[i], reference, meta]) + "\n")
                    self._workers[w].stdin.flush()
                except (BrokenPipeError, OSError):
                    self._restart(w)
                    self._workers[w].stdin.write(json.dumps([texts[i], reference, meta]) + "\n")
                    self._workers[w].stdin.flush()
                batch.append((w, i, time.monotonic() + self.timeout_s))
            for w, i, deadline in batch:
                proc = self._workers[w]
                self.stats.calls += 1
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    self.stats.timeouts += 1
                    log.warning("reward function %s timed out after %.1fs (scored 0)", self.spec, self.timeout_s)
                    self._restart(w)
                    continue
                line = proc.stdout.readline()
                if not line:
                    status, value = "error", "reward worker died"
                    self._restart(w)
                else:
                    status, value = json.loads(line)
                if status == "ok":
                    out[i] = float(value)
                else:
                    self.stats.errors += 1
                    self.stats.last_errors = (self.stats.last_errors + [str(value)])[-5:]
                    log.warning("reward function %s failed on a completion (scored 0): %s", self.spec, value)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        for p in self._workers:
            try:
                p.stdin.close()
                p.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if p.poll() is None:
                p.kill()
                p.wait(5)
            if p.stdout:
                p.stdout.close()
        self._workers = []

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
