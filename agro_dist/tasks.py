"""Tasks: where prompts, reference answers and the reward function come from.

- ``ArithmeticTask``: seeded arithmetic at four levels (1: a+b one digit, 2: a+b two digits,
  3: two digits x one digit, 4: a+b-c), with a fixed held-out split (a problem is held out iff a
  hash of its text says so, so train and eval never share a problem). Numeric reward.
- ``JsonlTask``: any JSONL file with configurable question/answer/id fields; presets for the
  MATH, MATH-500 and GSM8K files of ``shared/data`` (``load_task("math500", path)``). Bad input
  raises ``ValueError`` naming file, line and field.
- ``HFDatasetTask``: a local Hugging Face dataset folder (``datasets.load_from_disk``), same fields.
- ``format_prompt``: the chat template of the model's tokenizer around the question and the
  task's instruction (the paper's: step by step, then "The final answer is X").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

PAPER_INSTRUCTION = (
    "Solve the following problem step by step. At the end, write your final answer as "
    '"The final answer is X", where X is the answer.'
)
NUMBER_INSTRUCTION = "Answer with just the number."

log = logging.getLogger("agro_dist.tasks")


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    metadata: Dict[str, Any] = field(default_factory=dict)


class Task:
    name: str = "task"
    reward_fn: str = "math"
    instruction: str = PAPER_INSTRUCTION

    def train(self, seed: int = 0) -> Iterator[Problem]:
        """An endless, seeded stream of training problems."""
        raise NotImplementedError

    def eval_set(self, size: Optional[int] = None) -> List[Problem]:
        """The fixed held-out problems (the first ``size`` of them)."""
        raise NotImplementedError


def _held_out(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


class ArithmeticTask(Task):
    """Arithmetic problems; answers computed with Python integers (nothing is evaluated)."""

    LEVELS = {1: "1-digit addition", 2: "2-digit addition", 3: "2-digit times 1-digit", 4: "a + b - c"}
    reward_fn = "numeric"
    instruction = NUMBER_INSTRUCTION

    def __init__(self, levels=(1,), *, eval_fraction: float = 0.2, eval_size: int = 200, eval_seed: int = 12345):
        bad = [lv for lv in levels if lv not in self.LEVELS]
        if bad or not levels:
            raise ValueError(f"arithmetic levels must be among {sorted(self.LEVELS)}, got {list(levels)}")
        self.levels = tuple(levels)
        self.name = "arithmetic-" + "-".join(map(str, self.levels))
        self.eval_fraction = eval_fraction
        self.eval_size = eval_size
        self.eval_seed = eval_seed

    @staticmethod
    def make(level: int, rng: random.Random) -> Problem:
        if level == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            q, ans = f"What is {a} + {b}?", a + b
        elif level == 2:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, ans = f"What is {a} + {b}?", a + b
        elif level == 3:
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            q, ans = f"What is {a} * {b}?", a * b
        else:
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)
            q, ans = f"What is {a} + {b} - {c}?", a + b - c
        return Problem(id=f"L{level}:{q}", question=q, answer=str(ans), metadata={"level": level, "answer": str(ans)})

    def _draw(self, rng: random.Random, want_eval: bool) -> Problem:
        while True:
            p = self.make(rng.choice(self.levels), rng)
            if _held_out(p.question, self.eval_fraction) == want_eval:
                return p

    def train(self, seed: int = 0) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            yield self._draw(rng, want_eval=False)

    def eval_set(self, size: Optional[int] = None) -> List[Problem]:
        size = self.eval_size if size is None else size
        rng = random.Random(self.eval_seed)
        out, seen = [], set()
        # Level 1 has only 100 problems (20 held out): the set is then every distinct one.
        for _ in range(200 * max(size, 1)):
            if len(out) >= size:
                break
            p = self._draw(rng, want_eval=True)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
        return out


def _gsm8k_answer(value: str) -> str:
    if "####" not in value:
        raise ValueError("no '#### N' final answer")
    return value.split("####")[-1].strip()


PRESETS = {
    # name: question field, answer field, id field, answer transform, reward, skip invalid records
    # (MATH train has 2 records with an empty \boxed{} upstream: skipped with a warning each)
    "math": ("problem", "answer", "unique_id", None, "math", True),
    "math500": ("problem", "answer", "unique_id", None, "math", False),
    "gsm8k": ("question", "answer", None, _gsm8k_answer, "numeric", False),
}


class JsonlTask(Task):
    """Problems from a JSONL file. Training draws from ``train_path`` (seeded, with reshuffles);
    the eval set is ``eval_path`` (or, without one, a fixed hashed fraction held out of
    ``train_path``)."""

    def __init__(
        self,
        train_path: Optional[str],
        *,
        eval_path: Optional[str] = None,
        question_field: str = "problem",
        answer_field: str = "answer",
        id_field: Optional[str] = None,
        answer_transform: Optional[Callable[[str], str]] = None,
        reward_fn: str = "math",
        instruction: str = PAPER_INSTRUCTION,
        eval_fraction: float = 0.1,
        name: str = "jsonl",
        skip_invalid: bool = False,
    ):
        if not train_path and not eval_path:
            raise ValueError("JsonlTask needs train_path or eval_path")
        self.name, self.reward_fn, self.instruction = name, reward_fn, instruction
        fields = dict(question_field=question_field, answer_field=answer_field, id_field=id_field,
                      answer_transform=answer_transform, skip_invalid=skip_invalid)
        self._train = read_jsonl_problems(train_path, **fields) if train_path else []
        if eval_path:
            self._eval = read_jsonl_problems(eval_path, **fields)
        else:
            self._eval = [p for p in self._train if _held_out(p.id, eval_fraction)]
            self._train = [p for p in self._train if not _held_out(p.id, eval_fraction)]

    def train(self, seed: int = 0) -> Iterator[Problem]:
        if not self._train:
            raise ValueError(f"task {self.name}: no training problems")
        rng = random.Random(seed)
        while True:
            order = list(range(len(self._train)))
            rng.shuffle(order)
            for i in order:
                yield self._train[i]

    def eval_set(self, size: Optional[int] = None) -> List[Problem]:
        return self._eval if size is None else self._eval[:size]


def read_jsonl_problems(path: str, *, question_field: str, answer_field: str, id_field: Optional[str] = None,
                        answer_transform: Optional[Callable[[str], str]] = None, skip_invalid: bool = False) -> List[Problem]:
    """Problems of a JSONL file; a bad record raises ``ValueError`` naming file, line and field
    (with ``skip_invalid``: it is logged with the same words, counted, and skipped)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"task data not found: {path}")
    out, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_problem(path, lineno, line, question_field, answer_field, id_field, answer_transform))
            except ValueError as e:
                if not skip_invalid:
                    raise
                skipped += 1
                log.warning("skipped: %s", e)
    if skipped:
        log.warning("%s: %d invalid records skipped, %d read", path, skipped, len(out))
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def _problem(path, lineno, line, question_field, answer_field, id_field, answer_transform) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object")
    for fld in (question_field, answer_field):
        if fld not in row:
            raise ValueError(f"{path}:{lineno}: field {fld!r} missing")
        if not isinstance(row[fld], (str, int, float)) or str(row[fld]).strip() == "":
            raise ValueError(f"{path}:{lineno}: field {fld!r} is empty or not a string")
    ans = str(row[answer_field])
    if answer_transform:
        try:
            ans = answer_transform(ans)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: field {answer_field!r}: {e}") from None
    pid = str(row[id_field]) if id_field and id_field in row else f"{os.path.basename(path)}:{lineno}"
    meta = {k: v for k, v in row.items() if k not in (question_field, answer_field) and isinstance(v, (str, int, float))}
    meta["answer"] = ans
    return Problem(id=pid, question=str(row[question_field]), answer=ans, metadata=meta)


class HFDatasetTask(JsonlTask):
    """A local Hugging Face dataset folder (``datasets.save_to_disk``) with configurable fields."""

    def __init__(self, path: str, *, split: str = "train", eval_split: Optional[str] = "test", question_field: str = "problem",
                 answer_field: str = "answer", id_field: Optional[str] = None, reward_fn: str = "math",
                 instruction: str = PAPER_INSTRUCTION, name: str = "hf"):
        try:
            import datasets
        except ImportError:
            raise ImportError("HFDatasetTask needs the `datasets` package: pip install datasets") from None
        ds = datasets.load_from_disk(path)
        self.name, self.reward_fn, self.instruction = name, reward_fn, instruction

        def rows(split_name):
            out = []
            for i, row in enumerate(ds[split_name]):
                for fld in (question_field, answer_field):
                    if row.get(fld) in (None, ""):
                        raise ValueError(f"{path}[{split_name}] row {i}: field {fld!r} missing or empty")
                pid = str(row[id_field]) if id_field else f"{split_name}:{i}"
                out.append(Problem(pid, str(row[question_field]), str(row[answer_field]), {"answer": str(row[answer_field])}))
            return out

        self._train = rows(split)
        self._eval = rows(eval_split) if eval_split and eval_split in ds else [p for p in self._train if _held_out(p.id, 0.1)]


def load_task(name: str, path: Optional[str] = None, **kw) -> Task:
    """``arithmetic`` (``levels=(1, 2)``), ``math``/``math500``/``gsm8k`` (a JSONL file or the data
    folder holding ``train.jsonl``/``test.jsonl``), or ``jsonl`` with explicit fields."""
    if name == "arithmetic":
        return ArithmeticTask(**kw)
    if name in PRESETS:
        q, a, i, tf, rf, skip = PRESETS[name]
        kw.setdefault("skip_invalid", skip)
        if path is None:
            raise ValueError(f"task {name!r} needs a data path (a .jsonl file or a folder with train.jsonl/test.jsonl)")
        if os.path.isdir(path):
            train = os.path.join(path, "train.jsonl")
            test = os.path.join(path, "test.jsonl")
            return JsonlTask(train if os.path.exists(train) else None, eval_path=test if os.path.exists(test) else None,
                             question_field=q, answer_field=a, id_field=i, answer_transform=tf, reward_fn=rf, name=name, **kw)
        return JsonlTask(path, question_field=q, answer_field=a, id_field=i, answer_transform=tf, reward_fn=rf, name=name, **kw)
    if name == "jsonl":
        return JsonlTask(path, **kw)
    raise ValueError(f"unknown task {name!r}: arithmetic, math, math500, gsm8k or jsonl")


def format_prompt(tokenizer, problem: Problem, instruction: str) -> str:
    """The chat template around ``question + instruction`` (a plain concatenation for tokenizers
    without a template)."""
    content = f"{problem.question}\n\n{instruction}" if instruction else problem.question
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return content + "\n"
