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
  named (``"math"``, ``"numeric"``) or given by import path (``"package.module:function"``) in
  one of three signatures (``KINDS``: agro_dist's per completion, TRL's batched, verl's
  ``compute_score``); several with weights sum (``reward_parts``). User guide: docs/rewards.md.
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

# How a reward function is called, read from its parameters' names (``reward_kind``):
# - "completion" (agro_dist's): ``fn(text, reference, metadata) -> float``, one completion a call;
# - "batched" (TRL's): ``fn(prompts, completions, **columns) -> list[float | None]``, a group a call,
#   every list one entry per completion; None: the function does not apply to that completion
#   (it adds 0, as TRL's nansum does) and is counted;
# - "verl" (verl's ``compute_score``): ``fn(data_source, solution_str, ground_truth, extra_info)``,
#   one completion a call, returning a number or a dict with a "score".
KINDS = ("completion", "batched", "verl")


def resolve_reward_fn(spec: str) -> Callable[..., Any]:
    """``"math"``, ``"numeric"``, or ``"package.module:function"``."""
    if not isinstance(spec, str):
        raise ValueError(f"reward function {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
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


def reward_kind(fn: Callable[..., Any]) -> str:
    """Which of ``KINDS`` a function is, from its parameters' names."""
    import inspect

    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: called as agro_dist's
        return "completion"
    if "completions" in names:
        return "batched"
    if "solution_str" in names:
        return "verl"
    return "completion"


# train.csv's own reward_* columns, which a function's reward_<name> must not take.
_RESERVED_COLUMNS = ("reward_mean", "reward_timeouts", "reward_errors", "reward_s")


@dataclass
class RewardPart:
    """One reward function of ``generator.reward_fn``: its import spec, weight and column name."""

    fn: str
    weight: float = 1.0
    name: str = ""


def reward_parts(spec: Any) -> List[RewardPart]:
    """``generator.reward_fn`` as a list of parts: a spec string (one function, weight 1), or a
    list of spec strings and ``{fn: SPEC, weight: W, name: N}`` mappings (TRL's ``reward_funcs``
    with ``reward_weights``); the reward is the weighted sum. Names default to the function's
    (``pkg.mod:fn`` -> ``fn``), made unique with a suffix."""
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ValueError("reward functions: the list is empty")
    parts, seen = [], set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            part = RewardPart(item)
        elif isinstance(item, dict) and set(item) <= {"fn", "weight", "name"} and isinstance(item.get("fn"), str):
            w = item.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w:
                raise ValueError(f"reward function {i} ({item['fn']}): weight must be a number, got {w!r}")
            part = RewardPart(item["fn"], float(w), str(item.get("name") or ""))
        else:
            raise ValueError(f"reward function {i}: expected 'pkg.module:function' or {{fn: ..., weight: ..., name: ...}}, got {item!r}")
        base = part.name or part.fn.rsplit(":", 1)[-1]
        name, k = base, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"reward function {i}: name {name!r} must be letters, digits, '_', '.' or '-' (a column of train.csv)")
        if f"reward_{name}" in _RESERVED_COLUMNS:
            raise ValueError(f"reward function {i}: name {name!r} would make the column reward_{name}, which train.csv has "
                             f"already: give it another name ({{fn: {part.fn}, name: ...}})")
        seen.add(name)
        part.name = name
        parts.append(part)
    return parts


def check_reward_spec(spec: Any) -> List[RewardPart]:
    """Parse and import every function of ``spec`` (in this process): ValueError on a bad one."""
    parts = reward_parts(spec)
    for p in parts:
        resolve_reward_fn(p.fn)
    return parts


def call_reward(fn: Callable[..., Any], kind: str, texts: List[str], reference: str, metadata: Dict[str, Any],
                prompt: Any = None) -> List[Optional[float]]:
    """One value per text (None where a batched function says it does not apply); raises
    ValueError on a value that is not a finite number, or a list of the wrong length."""
    if kind == "batched":
        n = len(texts)
        chat = isinstance(prompt, list)
        kw: Dict[str, Any] = {k: [v] * n for k, v in metadata.items() if k not in ("prompts", "completions")}
        kw.setdefault("answer", [reference] * n)  # logged data keeps the reference outside its metadata
        kw["prompts"] = [prompt] * n
        kw["completions"] = [[{"role": "assistant", "content": t}] for t in texts] if chat else list(texts)
        values = fn(**_accepted(fn, kw))
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"a batched reward function must return a list of {n} values (one per completion), got {values!r:.80}")
        return [None if v is None else _finite(v) for v in values]
    if kind == "verl":  # verl's custom reward function, or one of its built-in compute_score(solution_str, ground_truth, ...)
        out = []
        for t in texts:
            kw = dict(data_source=metadata.get("data_source"), solution_str=t, ground_truth=reference, extra_info=metadata.get("extra_info"))
            v = fn(**_accepted(fn, kw))
            out.append(_finite(v["score"] if isinstance(v, dict) else v))
        return out
    return [_finite(fn(t, reference, metadata)) for t in texts]


def _accepted(fn: Callable[..., Any], kw: Dict[str, Any]) -> Dict[str, Any]:
    """The keyword arguments ``fn`` takes: all of them if it has ``**kwargs``."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kw
    return {k: v for k, v in kw.items() if k in params}


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)  # numpy and torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"reward function returned {v!r:.80}, not a number") from None
    v = float(v)
    if v != v or abs(v) == float("inf"):
        raise ValueError(f"reward function returned {v}")
    return v


# --------------------------------------------------------------------------- the scorer


@dataclass
class ScorerStats:
    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    not_applicable: int = 0  # a batched function's None: the completion adds 0
    seconds: float = 0.0
    total: float = 0.0  # sum of the values returned (errors and timeouts score 0)
    scored: int = 0  # completions scored (the mean's denominator)
    last_errors: List[str] = field(default_factory=list)


class FunctionScorer:
    """One reward function in worker processes, each call limited in time.

    Workers are plain subprocesses (``python -m agro_dist.tasks.reward_worker``) speaking JSON lines:
    they start once, never import the caller's ``__main__`` (so scripts need no main guard), and a
    worker whose call times out (or dies) is killed and replaced (~1 s). A per-completion function
    gets one completion a call (``timeout_s`` each, spread over the workers); a batched one a group
    a call (``timeout_s`` per completion in it)."""

    def __init__(self, spec: str, *, timeout_s: float = 5.0, workers: int = 1):
        self.kind = reward_kind(resolve_reward_fn(spec))  # fail early, in the caller's process, on a bad name
        self.spec = spec
        self.timeout_s = timeout_s
        self.stats = ScorerStats()
        self._workers = [self._start() for _ in range(max(1, workers))]

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])  # user functions importable as here
        return subprocess.Popen([sys.executable, "-m", "agro_dist.tasks.reward_worker", self.spec], stdin=subprocess.PIPE,
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

    def _send(self, w: int, job: str) -> None:
        try:
            self._workers[w].stdin.write(job)
            self._workers[w].stdin.flush()
        except (BrokenPipeError, OSError):
            self._restart(w)
            self._workers[w].stdin.write(job)
            self._workers[w].stdin.flush()

    def score(self, texts: Sequence[str], reference: str, metadata: Optional[Dict[str, Any]] = None, prompt: Any = None) -> List[float]:
        """One value per text; 0.0 for a call that raised, returned something other than a finite
        number, or timed out (each counted), and for a batched function's None."""
        out: List[float] = [0.0] * len(texts)
        meta = metadata or {}
        # Jobs: (indices, json line, seconds allowed); one per completion, or one per group.
        if self.kind == "batched":
            jobs = [(list(range(len(texts))), [list(texts), reference, meta, prompt], self.timeout_s * max(1, len(texts)))]
        else:
            jobs = [([i], [[texts[i]], reference, meta, prompt], self.timeout_s) for i in range(len(texts))]
        t0 = time.perf_counter()
        while jobs:
            batch = []
            for w in range(len(self._workers)):
                if not jobs:
                    break
                idx, job, limit = jobs.pop(0)
                self._send(w, json.dumps(job) + "\n")
                batch.append((w, idx, time.monotonic() + limit, limit))
            for w, idx, deadline, limit in batch:
                proc = self._workers[w]
                self.stats.calls += 1
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    self.stats.timeouts += 1
                    log.warning("reward function %s timed out after %.1fs (scored 0)", self.spec, limit)
                    self._restart(w)
                    continue
                line = proc.stdout.readline()
                if not line:
                    status, value = "error", "reward worker died"
                    self._restart(w)
                else:
                    status, value = json.loads(line)
                if status == "ok":
                    for i, v in zip(idx, value):
                        if v is None:
                            self.stats.not_applicable += 1
                        else:
                            out[i] = float(v)
                else:
                    self.stats.errors += 1
                    self.stats.last_errors = (self.stats.last_errors + [str(value)])[-5:]
                    log.warning("reward function %s failed on %s (scored 0): %s", self.spec,
                                "a completion" if len(idx) == 1 else f"a group of {len(idx)}", value)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.total += sum(out)
        self.stats.scored += len(out)
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


class RewardScorer:
    """The reward of ``generator.reward_fn``: one function, or the weighted sum of several
    (``reward_parts``), each in its own worker processes, timed and counted apart.

    ``stats``: the counts of all functions together (timeouts, errors); ``part_stats()``: each
    function's, by name, with the mean of its values (train.csv's ``reward_<name>`` columns)."""

    def __init__(self, reward_fn: Any = "math", *, timeout_s: float = 5.0, workers: int = 1):
        self.parts = reward_parts(reward_fn)
        self.spec = reward_fn
        self.timeout_s = timeout_s
        self.scorers: List[FunctionScorer] = []
        try:
            for p in self.parts:
                self.scorers.append(FunctionScorer(p.fn, timeout_s=timeout_s, workers=workers))
        except BaseException:
            self.close()
            raise

    @property
    def stats(self) -> ScorerStats:
        out = ScorerStats()
        for sc in self.scorers:
            st = sc.stats
            out.calls += st.calls
            out.timeouts += st.timeouts
            out.errors += st.errors
            out.not_applicable += st.not_applicable
            out.seconds += st.seconds
            out.last_errors = (out.last_errors + st.last_errors)[-5:]
        return out

    def part_stats(self) -> Dict[str, Dict[str, float]]:
        """name -> {sum, count, timeouts, errors, not_applicable}, cumulative."""
        return {p.name: dict(sum=sc.stats.total, count=sc.stats.scored, timeouts=sc.stats.timeouts, errors=sc.stats.errors,
                             not_applicable=sc.stats.not_applicable) for p, sc in zip(self.parts, self.scorers)}

    def score(self, texts: Sequence[str], reference: str, metadata: Optional[Dict[str, Any]] = None, prompt: Any = None) -> List[float]:
        """One reward per text: the weighted sum of the functions' values."""
        total = [0.0] * len(texts)
        for p, sc in zip(self.parts, self.scorers):
            for i, v in enumerate(sc.score(texts, reference, metadata, prompt)):
                total[i] += p.weight * v
        return total

    def close(self) -> None:
        for sc in self.scorers:
            sc.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
