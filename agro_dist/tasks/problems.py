"""Tasks: where prompts, reference answers and the reward function come from.

- ``ArithmeticTask``: seeded arithmetic at four levels (1: a+b one digit, 2: a+b two digits,
  3: two digits x one digit, 4: a+b-c), with a fixed held-out split (a problem is held out iff a
  hash of its text says so, so train and eval never share a problem). Numeric reward.
- ``JsonlTask``: any JSONL file with configurable question/answer/id fields; presets for the
  MATH, MATH-500 and GSM8K files of ``shared/data`` (``load_task("math500", path)``). Bad input
  raises ``ValueError`` naming file, line and field.
- ``DatasetTask`` (``dataset``): your prompts from JSONL/JSON/Parquet/CSV files, a folder of them,
  a ``datasets.save_to_disk`` folder or a hub name; plain-text or chat prompts, verl's Parquet
  layout read as it is; bad rows named by file and line or row index.
- ``format_prompt``: the chat template of the model's tokenizer (or the task's own) around an
  optional system turn, the question and the task's instruction (the paper's: step by step, then
  "The final answer is X"), or the raw text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
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
    messages: Optional[List[Dict[str, str]]] = None  # a chat prompt (the data's own turns); question is its last user turn


class Task:
    name: str = "task"
    reward_fn: str = "math"
    instruction: str = PAPER_INSTRUCTION
    # How prompts are written (task_options system_prompt, chat_template, raw_prompt; see ``set_chat``).
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None
    raw_prompt: bool = False

    def set_chat(self, *, system_prompt: Optional[str] = None, chat_template: Optional[str] = None, raw_prompt: bool = False,
                 instruction: Optional[str] = None) -> None:
        """The prompt's form: a system turn, a Jinja chat template instead of the tokenizer's (the
        template's text or a file holding it), or ``raw_prompt`` (no template: the question and
        the instruction as they are); ``instruction`` replaces the task's ("" for none, "paper"
        for the paper's)."""
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"task_options.system_prompt must be a string, got {system_prompt!r}")
        if raw_prompt and (system_prompt or chat_template):
            raise ValueError("task_options.raw_prompt writes no chat template: it takes no system_prompt or chat_template")
        if chat_template is not None:
            chat_template = _read_template(chat_template)
        if instruction is not None:
            if not isinstance(instruction, str):
                raise ValueError(f"task_options.instruction must be a string, got {instruction!r}")
            self.instruction = PAPER_INSTRUCTION if instruction == "paper" else instruction
        self.system_prompt, self.chat_template, self.raw_prompt = system_prompt or None, chat_template, bool(raw_prompt)

    def prompt(self, tokenizer, problem: "Problem") -> str:
        """The text the generator samples from for ``problem``."""
        return format_prompt(tokenizer, problem, self.instruction, system_prompt=self.system_prompt,
                             chat_template=self.chat_template, raw=self.raw_prompt)

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
        return _endless(self._train, seed, self.name)

    def eval_set(self, size: Optional[int] = None) -> List[Problem]:
        return self._eval if size is None else self._eval[:size]


def _endless(problems: List[Problem], seed: int, name: str) -> Iterator[Problem]:
    """The problems in a seeded order, reshuffled at each pass, forever."""
    if not problems:
        raise ValueError(f"task {name}: no training problems")

    def gen():
        rng = random.Random(seed)
        while True:
            order = list(range(len(problems)))
            rng.shuffle(order)
            for i in order:
                yield problems[i]

    return gen()


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


# --------------------------------------------------------------------------- any dataset

# The answer column when task_options.answer_key is not given: the first the data has. verl's
# Parquet layout keeps it in reward_model.ground_truth.
ANSWER_KEYS = ("answer", "reward_model.ground_truth", "ground_truth", "solution")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_ROLES = ("system", "user", "assistant")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gsm8k", "openai/gsm8k"


def _get_path(row: Dict[str, Any], key: str) -> Any:
    """``row["a"]["b"]`` for ``key`` "a.b" (verl's ``reward_model.ground_truth``); KeyError if absent."""
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def _data_files(path: str, split: str) -> List[str]:
    """A folder's files for ``split``: ``<split>.jsonl``/``.parquet``/``.csv``/``.json``, or
    ``<split>-*.parquet`` shards (the hub's layout), sorted."""
    import glob

    out = []
    for suf in DATA_SUFFIXES:
        out += [os.path.join(path, split + suf)] if os.path.exists(os.path.join(path, split + suf)) else []
        out += sorted(glob.glob(os.path.join(path, f"{split}-*{suf}")))
        out += sorted(glob.glob(os.path.join(path, "data", f"{split}-*{suf}")))
    return out


def _rows_of_file(path: str) -> Iterator[tuple]:
    """(where, row) for every record of a JSONL, JSON (a list or lines), Parquet or CSV file;
    ``where`` names the file and line (text files) or row index (Parquet, CSV)."""
    low = path.lower()
    if low.endswith(".parquet") or low.endswith(".csv"):
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a JSON array of records
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            for i, row in enumerate(rows):
                yield f"{path} record {i}", row
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}:{lineno}", row


def _hub_rows(name: str, split: str, config: Optional[str]) -> Iterator[tuple]:
    import datasets

    from agro_dist.io.models import hub_reachable

    why = hub_reachable()
    if why:
        raise ValueError(f"{name!r} is not a local file or folder, and the Hugging Face hub is not reachable to fetch it ({why}): "
                         f"pass a local data file (JSONL, Parquet, CSV), a folder of them, or a folder saved with "
                         f"datasets' save_to_disk (python -m agro_dist.data prep makes one from local files)")
    ds = datasets.load_dataset(name, config, split=split)
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row


def read_rows(path: str, split: str = "train", *, hub_config: Optional[str] = None) -> Optional[List[tuple]]:
    """(where, row) of every record of ``split``: ``path`` is a data file (that split's), a folder
    of files named by split (``train.parquet``, ``test.jsonl``, ...), a folder saved by
    ``datasets.save_to_disk`` (a ``DatasetDict`` or one ``Dataset``), or a hub dataset name.
    None when a folder or hub dataset has no such split."""
    full = os.path.expanduser(path)
    if os.path.isfile(full):
        return list(_rows_of_file(full))
    if os.path.isdir(full):
        if os.path.exists(os.path.join(full, "dataset_dict.json")) or os.path.exists(os.path.join(full, "state.json")):
            import datasets

            ds = datasets.load_from_disk(full)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    return None
                ds = ds[split]
            elif split != "train":
                return None  # one saved Dataset is the training split
            return [(f"{path}[{split}] row {i}", row) for i, row in enumerate(ds)]
        files = _data_files(full, split)
        if not files:
            if split == "train":
                raise ValueError(f"{path}: no {split} data in the folder (expected {split}.jsonl, {split}.parquet, {split}.csv, "
                                 f"{split}-*.parquet, or a datasets.save_to_disk folder)")
            return None
        return [r for f in files for r in _rows_of_file(f)]
    if not HUB_NAME.fullmatch(path) or path.lower().endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"task data not found: {path}")
    try:
        return list(_hub_rows(path, split, hub_config))
    except ValueError as e:
        if "Unknown split" in str(e):
            return None
        raise


class DatasetTask(Task):
    """Prompts from your data: JSONL, JSON, Parquet or CSV files, a folder of them named by split,
    a ``datasets.save_to_disk`` folder, or a hub dataset name (where the network allows).

    ``prompt_key``: a plain-text column or a chat prompt (a list of ``{role, content}`` turns, TRL's
    and verl's conversational form); ``answer_key``: the reference answer, dotted for nested
    columns (verl's ``reward_model.ground_truth``; default: the first of ``ANSWER_KEYS`` the data
    has). The row's other columns go to the reward function. Held-out problems: ``eval_path`` (a
    second file or folder), else the ``eval_split`` of ``path`` (default ``test``) where it has
    one, else a fixed hashed ``eval_fraction`` of the training rows. No instruction is added to
    the prompts unless ``instruction`` is given (they are your prompts)."""

    def __init__(self, path: str, *, prompt_key: str = "prompt", answer_key: Optional[str] = None, id_key: Optional[str] = None,
                 split: str = "train", eval_path: Optional[str] = None, eval_split: str = "test", eval_fraction: float = 0.1,
                 hub_config: Optional[str] = None, reward_fn: str = "math", name: str = "dataset", **chat):
        if not path:
            raise ValueError("task dataset needs generator.task_path: a data file, a folder, or a hub dataset name")
        self.name, self.reward_fn, self.instruction = name, reward_fn, ""
        self.set_chat(**chat)
        self.prompt_key, self.answer_key, self.id_key = prompt_key, answer_key, id_key
        rows = read_rows(path, split, hub_config=hub_config)
        if not rows:
            raise ValueError(f"{path}: no rows in split {split!r}")
        if self.answer_key is None:
            first = rows[0][1] if isinstance(rows[0][1], dict) else {}
            found = [k for k in ANSWER_KEYS if _has(first, k)]
            if not found:
                raise ValueError(f"{rows[0][0]}: no answer column ({', '.join(ANSWER_KEYS)}; columns: {sorted(first)}): "
                                 f"set task_options.answer_key")
            self.answer_key = found[0]
        self._train = [self._problem(where, row) for where, row in rows]
        ev = None
        if eval_path:  # a file is read whole; a folder or hub dataset gives its eval_split
            ev = read_rows(eval_path, eval_split, hub_config=hub_config)
            if not ev:
                raise ValueError(f"task_options.eval_path {eval_path}: no rows (split {eval_split!r})")
        elif not os.path.isfile(os.path.expanduser(path)):
            ev = read_rows(path, eval_split, hub_config=hub_config)
        if ev:
            self._eval = [self._problem(where, row) for where, row in ev]
        else:
            self._eval = [p for p in self._train if _held_out(p.id, eval_fraction)]
            self._train = [p for p in self._train if not _held_out(p.id, eval_fraction)]

    def _problem(self, where: str, row: Any) -> Problem:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a record with columns, got {type(row).__name__}")
        try:
            prompt = _get_path(row, self.prompt_key)
        except KeyError:
            raise ValueError(f"{where}: field {self.prompt_key!r} missing (columns: {sorted(row)}; set task_options.prompt_key)") from None
        messages = None
        if isinstance(prompt, list):
            messages = _messages(where, self.prompt_key, prompt)
            if self.raw_prompt:
                raise ValueError(f"{where}: field {self.prompt_key!r} is a chat prompt; task_options.raw_prompt needs plain text")
            if self.system_prompt and messages[0]["role"] == "system":
                raise ValueError(f"{where}: field {self.prompt_key!r} has its own system turn and task_options.system_prompt is "
                                 f"set: drop one")
            question = [m["content"] for m in messages if m["role"] == "user"][-1]
        elif isinstance(prompt, str) and prompt.strip():
            question = prompt
        else:
            raise ValueError(f"{where}: field {self.prompt_key!r} must be a non-empty string or a list of chat turns, got {prompt!r:.80}")
        try:
            ans = _get_path(row, self.answer_key)
        except KeyError:
            raise ValueError(f"{where}: field {self.answer_key!r} missing (columns: {sorted(row)}; set task_options.answer_key)") from None
        if isinstance(ans, list) and len(ans) == 1:
            ans = ans[0]
        if isinstance(ans, bool) or not isinstance(ans, (str, int, float)) or str(ans).strip() == "":
            raise ValueError(f"{where}: field {self.answer_key!r} must be a non-empty string or number, got {ans!r:.80}")
        if self.id_key:
            try:
                pid = str(_get_path(row, self.id_key))
            except KeyError:
                raise ValueError(f"{where}: field {self.id_key!r} missing (task_options.id_key)") from None
        else:
            pid = where.rsplit("/", 1)[-1]
        meta = {k: v for k, v in row.items() if k != self.prompt_key.split(".")[0] and _json_safe(v)}
        meta["answer"] = str(ans)
        return Problem(id=pid, question=question, answer=str(ans), metadata=meta, messages=messages)

    def train(self, seed: int = 0) -> Iterator[Problem]:
        return _endless(self._train, seed, self.name)

    def eval_set(self, size: Optional[int] = None) -> List[Problem]:
        return self._eval if size is None else self._eval[:size]


def _has(row: Dict[str, Any], key: str) -> bool:
    try:
        _get_path(row, key)
        return True
    except KeyError:
        return False


def _json_safe(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _messages(where: str, key: str, turns: List[Any]) -> List[Dict[str, str]]:
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: field {key!r} turn {i}: expected {{role: system|user|assistant, content: text}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: field {key!r} has no user turn")
    return out


def load_task(name: str, path: Optional[str] = None, **kw) -> Task:
    """``arithmetic`` (``levels=(1, 2)``), ``math``/``math500``/``gsm8k`` (a JSONL file or the data
    folder holding ``train.jsonl``/``test.jsonl``), ``jsonl`` with explicit fields, or ``dataset``
    (``DatasetTask``: files, folders, saved or hub datasets, chat prompts). Every task takes the
    chat options (``CHAT_OPTIONS``: system_prompt, chat_template, raw_prompt, instruction)."""
    if name == "dataset":
        return DatasetTask(path, **kw)
    chat = {k: kw.pop(k) for k in CHAT_OPTIONS if k in kw}
    task = _load_task(name, path, **kw)
    task.set_chat(**chat)
    return task


def _load_task(name: str, path: Optional[str] = None, **kw) -> Task:
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
    raise ValueError(f"unknown task {name!r}: arithmetic, math, math500, gsm8k, jsonl or dataset")


CHAT_OPTIONS = ("system_prompt", "chat_template", "raw_prompt", "instruction")


def _read_template(value: Any) -> str:
    """A Jinja chat template: a file's text when ``value`` names a file, else ``value`` itself;
    compiled here so that a broken one fails before anything starts."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"task_options.chat_template must be a Jinja template or a file holding one, got {value!r}")
    text = value
    if "{" not in value and os.path.isfile(os.path.expanduser(value)):
        with open(os.path.expanduser(value), encoding="utf-8") as f:
            text = f.read()
    elif "{" not in value:
        raise ValueError(f"task_options.chat_template {value!r}: no such file, and not a Jinja template (no '{{')")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment().from_string(text)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateSyntaxError and friends
        raise ValueError(f"task_options.chat_template: not a valid Jinja template: {e}") from None
    return text


def format_prompt(tokenizer, problem: Problem, instruction: str, *, system_prompt: Optional[str] = None,
                  chat_template: Optional[str] = None, raw: bool = False) -> str:
    """The prompt text: the chat template (the tokenizer's, or ``chat_template``) around an
    optional system turn and the problem's turns, the instruction appended to the last user turn;
    ``raw``: the question and instruction as they are. A tokenizer with no template and no
    override gets the turns' contents joined by blank lines."""
    if raw:
        return f"{problem.question}\n\n{instruction}" if instruction else problem.question
    messages = [dict(m) for m in problem.messages] if problem.messages else [{"role": "user", "content": problem.question}]
    if instruction:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = f"{messages[last]['content']}\n\n{instruction}"
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
    return "\n\n".join(m["content"] for m in messages) + "\n"
