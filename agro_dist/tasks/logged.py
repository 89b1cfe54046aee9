"""Logged generations: the file format for offline training, reading it, and writing it
(``python -m agro_dist.data`` is the command that samples and prepares such files).

    python -m agro_dist.data sample --model default --task arithmetic --n 4 --prompts 256 --out pi_ref.jsonl
    python -m agro_dist --run.mode offline --data.path pi_ref.jsonl --run.epochs 3

**The format** (JSONL, one group per line; Parquet with the same columns):

    {"prompt": "...", "completions": ["...", ...], "rewards": [1.0, 0.0, ...]}

- ``prompt`` (a string used verbatim) or ``messages`` (a chat: ``[{"role": "user", "content":
  "..."}]``, rendered with the policy's chat template and the generation prompt): exactly one.
- ``completions``: one or more strings. ``rewards``: one number per completion; may be left out
  when a reward function is configured (the task's or ``generator.reward_fn``): the completions
  are then scored once at load in the time-limited reward workers, against ``answer``.
- Optional: ``answer`` (the reference for scoring and evaluation), ``id`` (unique; default
  ``line N``), ``behavior_logprobs`` (one list per completion, one log-prob per completion
  token: the sampler's; needed by ``grpo``, never by ``agro_off``), ``finish_reasons``
  (``"stop"``/``"length"`` per completion, default ``"stop"``), ``prompt_ids`` and
  ``completion_ids`` (exact token ids; ``sample`` writes them).

**Tokens scored.** prompt tokens = ``tokenizer.encode(text)`` of the prompt text (the chat
template's output for ``messages``), exactly as vLLM tokenises a text prompt; completion tokens =
``tokenizer.encode(completion, add_special_tokens=False)``, plus the EOS token when the completion
finished by itself (``finish_reason`` ``"stop"``; a completion cut at the length limit gets none).
``prompt_ids``/``completion_ids``, when given, are used as they are instead (checked against the
vocabulary); ``behavior_logprobs`` must have one value per completion token either way.

Every record is checked before anything is trained: the first bad one stops the load with
``FILE:LINE: FIELD: what is wrong`` (nothing is trained on half a file).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from agro_dist.core.records import Completion, Group

log = logging.getLogger("agro_dist.data")  # the name users know from the command

KNOWN = {"prompt", "messages", "completions", "rewards", "answer", "id", "behavior_logprobs", "behaviour_logprobs",
         "finish_reasons", "prompt_ids", "completion_ids", "metadata"}


class LoggedDataError(ValueError):
    """A record that breaks the format: ``path:line: field: message``."""

    def __init__(self, path: str, line: Any, field: str, message: str):
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


def _is_parquet(path: str) -> bool:
    return path.endswith((".parquet", ".pq"))


def iter_records(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, record) for a JSONL or Parquet file (Parquet: row number, from 1)."""
    if not os.path.isfile(path):
        raise LoggedDataError(path, None, "", "file not found")
    if _is_parquet(path):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise LoggedDataError(path, None, "", f"not a readable Parquet file: {e}") from None
        for i, rec in enumerate(table.to_pylist(), 1):
            yield i, {k: v for k, v in rec.items() if v is not None}
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoggedDataError(path, i, "", f"not valid JSON: {e.msg} (column {e.colno})") from None
            yield i, rec


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _str_list(rec, key, path, line, n=None) -> List[str]:
    v = rec[key]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise LoggedDataError(path, line, key, f"expected a non-empty list of strings, got {_kind(v)}")
    if n is not None and len(v) != n:
        raise LoggedDataError(path, line, key, f"{len(v)} entries for {n} completions")
    return v


def _kind(v) -> str:
    if isinstance(v, list):
        return f"a list of {len(v)}" + (f" ({type(v[0]).__name__}...)" if v else "")
    return type(v).__name__


def _ids(v, key, path, line, vocab: int) -> List[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise LoggedDataError(path, line, key, f"expected a list of token ids, got {_kind(v)}")
    bad = [t for t in v if not 0 <= t < vocab]
    if bad:
        raise LoggedDataError(path, line, key, f"token id {bad[0]} outside the vocabulary (size {vocab})")
    return v


def _prompt_text(rec, tokenizer, path, line) -> str:
    if ("prompt" in rec) == ("messages" in rec):
        raise LoggedDataError(path, line, "prompt", "give exactly one of 'prompt' (text) and 'messages' (a chat)")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"]:
            raise LoggedDataError(path, line, "prompt", f"expected a non-empty string, got {_kind(rec['prompt'])}")
        return rec["prompt"]
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise LoggedDataError(path, line, "messages", "expected a non-empty list of {role: str, content: str}")
    if not getattr(tokenizer, "chat_template", None):
        raise LoggedDataError(path, line, "messages", "the policy's tokenizer has no chat template: give 'prompt' text instead")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def parse_record(rec: Any, path: str, line: int, tokenizer, *, vocab: int) -> Dict[str, Any]:
    """One record -> its parts (prompt text and ids, completion texts and ids, rewards or None,
    behaviour log-probs or None, finish reasons, answer, id), checked field by field."""
    if not isinstance(rec, dict):
        raise LoggedDataError(path, line, "", f"expected a JSON object, got {_kind(rec)}")
    unknown = sorted(set(rec) - KNOWN)
    if unknown:
        raise LoggedDataError(path, line, unknown[0], f"unknown field (known: {', '.join(sorted(KNOWN))})")
    if "completions" not in rec:
        raise LoggedDataError(path, line, "completions", "missing")
    texts = _str_list(rec, "completions", path, line)
    n = len(texts)
    text = _prompt_text(rec, tokenizer, path, line)
    rewards = None
    if "rewards" in rec:
        r = rec["rewards"]
        if not isinstance(r, list):
            raise LoggedDataError(path, line, "rewards", f"expected a list of numbers, got {_kind(r)}")
        if len(r) != n:
            raise LoggedDataError(path, line, "rewards", f"{len(r)} rewards for {n} completions")
        for i, x in enumerate(r):
            if not _num(x):
                raise LoggedDataError(path, line, f"rewards[{i}]", f"expected a finite number, got {x!r}")
        rewards = [float(x) for x in r]
    answer = rec.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise LoggedDataError(path, line, "answer", f"expected a string, got {_kind(answer)}")
    rid = rec.get("id", f"line {line}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        raise LoggedDataError(path, line, "id", f"expected a non-empty string, got {rid!r}")
    finish = _str_list(rec, "finish_reasons", path, line, n) if "finish_reasons" in rec else ["stop"] * n
    prompt_ids = _ids(rec["prompt_ids"], "prompt_ids", path, line, vocab) if "prompt_ids" in rec else tokenizer.encode(text)
    if not prompt_ids:
        raise LoggedDataError(path, line, "prompt", "the prompt has no tokens")
    if "completion_ids" in rec:
        c = rec["completion_ids"]
        if not isinstance(c, list) or len(c) != n:
            raise LoggedDataError(path, line, "completion_ids", f"expected {n} lists of token ids, got {_kind(c)}")
        comp_ids = [_ids(x, f"completion_ids[{i}]", path, line, vocab) for i, x in enumerate(c)]
    else:
        eos = tokenizer.eos_token_id
        comp_ids = [tokenizer.encode(t, add_special_tokens=False) + ([eos] if f == "stop" and eos is not None else [])
                    for t, f in zip(texts, finish)]
    for i, ids in enumerate(comp_ids):
        if not ids:
            raise LoggedDataError(path, line, f"completions[{i}]", "no tokens (an empty completion that did not stop)")
    key = "behavior_logprobs" if "behavior_logprobs" in rec else ("behaviour_logprobs" if "behaviour_logprobs" in rec else None)
    beh = None
    if key:
        b = rec[key]
        if not isinstance(b, list) or len(b) != n:
            raise LoggedDataError(path, line, key, f"expected {n} lists (one per completion), got {_kind(b)}")
        for i, (lp, ids) in enumerate(zip(b, comp_ids)):
            if not isinstance(lp, list) or len(lp) != len(ids):
                raise LoggedDataError(path, line, f"{key}[{i}]", f"{len(lp) if isinstance(lp, list) else _kind(lp)} log-probs "
                                      f"for {len(ids)} completion tokens")
            for x in lp:
                if not _num(x) or x > 1e-4:
                    raise LoggedDataError(path, line, f"{key}[{i}]", f"log-probs must be finite and <= 0, got {x!r}")
        beh = b
    return dict(text=text, prompt_ids=list(prompt_ids), texts=texts, comp_ids=comp_ids, rewards=rewards, beh=beh, finish=finish,
                answer=None if answer is None else str(answer), id=str(rid), metadata=rec.get("metadata") or {},
                prompt=rec.get("messages") or rec.get("prompt"))  # as a batched reward function takes it


def load_logged(path: str, tokenizer, *, reward_fn: Optional[str] = None, reward_timeout_s: float = 5.0,
                min_group_size: int = 1, need_behaviour: bool = False, loss: str = "") -> Tuple[List[Group], Dict[str, int]]:
    """Every group of a logged-data file, checked, tokenised, scored where rewards are missing.

    Groups smaller than ``min_group_size`` (a loss whose baseline needs two completions) are left
    out and counted; a file with none left, a loss that needs behaviour log-probs on a file without
    them, an empty file or any bad record raise ``LoggedDataError`` (naming file, line, field)."""
    vocab = len(tokenizer)
    parsed, seen = [], {}
    for line, rec in iter_records(path):
        p = parse_record(rec, path, line, tokenizer, vocab=vocab)
        if p["id"] in seen:
            raise LoggedDataError(path, line, "id", f"{p['id']!r} already used on line {seen[p['id']]} (ids must be unique)")
        seen[p["id"]] = line
        if need_behaviour and p["beh"] is None:
            raise LoggedDataError(path, line, "behavior_logprobs", f"missing: {loss} needs the sampler's log-probs of every "
                                  "completion (agro_off needs none)")
        if p["rewards"] is None:
            if not reward_fn:
                raise LoggedDataError(path, line, "rewards", "missing, and no reward function to score the completions "
                                      "(set generator.reward_fn or a task)")
            if p["answer"] is None:
                raise LoggedDataError(path, line, "answer", "missing: the completions have no rewards, and scoring them needs the answer")
        parsed.append((line, p))
    if not parsed:
        raise LoggedDataError(path, None, "", "no records (an empty file)")
    stats = dict(records=len(parsed), scored=0, reward_timeouts=0, too_small=0)
    todo = [p for _, p in parsed if p["rewards"] is None]
    if todo:
        from agro_dist.tasks.rewards import RewardScorer

        scorer = RewardScorer(reward_fn, timeout_s=reward_timeout_s)
        t = time.perf_counter()
        try:
            for p in todo:
                p["rewards"] = scorer.score(p["texts"], p["answer"], p["metadata"], p["prompt"])
        finally:
            scorer.close()
        stats["scored"], stats["reward_timeouts"] = len(todo), scorer.stats.timeouts
        log.info("%s: scored %d groups with %s in %.1f s (%d timed out)", path, len(todo), reward_fn, time.perf_counter() - t,
                 scorer.stats.timeouts)
    base = os.path.basename(path)
    groups = []
    for line, p in parsed:
        if len(p["texts"]) < min_group_size:
            stats["too_small"] += 1
            continue
        comps = [Completion(ids, lp if lp is not None else [0.0] * len(ids), r, f, t)
                 for ids, lp, r, f, t in zip(p["comp_ids"], p["beh"] or [None] * len(p["texts"]), p["rewards"], p["finish"], p["texts"])]
        meta = dict(p["metadata"], behaviour_logprobs=p["beh"] is not None, source=f"{base}:{line}")
        if p["answer"] is not None:
            meta["answer"] = p["answer"]
        groups.append(Group(prompt_id=p["id"], prompt=p["text"], prompt_token_ids=p["prompt_ids"], completions=comps,
                            policy_version=0, generator_id="logged", metadata=meta, group_id=f"logged:{base}:{p['id']}"))
    if stats["too_small"]:
        log.warning("%s: %d of %d groups have fewer than %d completions and are left out (%s needs a leave-one-out baseline; "
                    "agro_single trains on single completions)", path, stats["too_small"], len(parsed), min_group_size, loss)
    if not groups:
        raise LoggedDataError(path, None, "completions", f"no group has the {min_group_size} completions {loss} needs "
                              "(use --learner.loss agro_single for one completion per prompt)")
    return groups, stats


class LoggedBatches:
    """Offline runs: the learner's batches from the logged groups, epoch after epoch, each a fresh
    seeded shuffle (``shuffle``), a batch running on into the next epoch where one ends.
    ``consumed`` (groups handed out) is what a checkpoint keeps to resume where it stopped."""

    def __init__(self, groups: Sequence[Any], batch_groups: int, *, seed: int = 0, shuffle: bool = True):
        self.groups, self.batch_groups, self.seed, self.shuffle = groups, batch_groups, seed, shuffle
        self.consumed = 0
        self._order: Tuple[int, List[int]] = (-1, [])

    def __len__(self) -> int:
        return len(self.groups)

    def next(self) -> List[Any]:
        import random

        N, out = len(self.groups), []
        for _ in range(self.batch_groups):
            epoch, i = divmod(self.consumed, N)
            if self._order[0] != epoch:
                order = list(range(N))
                if self.shuffle:
                    random.Random(f"{self.seed}:{epoch}").shuffle(order)
                self._order = (epoch, order)
            out.append(self.groups[self._order[1][i]])
            self.consumed += 1
        return out

    @property
    def epochs_done(self) -> float:
        return self.consumed / len(self.groups) if self.groups else 0.0


def group_record(g: Group, rid: Optional[str] = None) -> Dict[str, Any]:
    """A group as a line of the logged-data format (exact ids and behaviour log-probs included)."""
    rec = {"id": rid or g.group_id, "prompt": g.prompt, "completions": [c.text for c in g.completions],
           "rewards": [float(c.reward) for c in g.completions], "answer": g.metadata.get("answer"),
           "finish_reasons": [c.finish_reason for c in g.completions],
           "prompt_ids": [int(t) for t in g.prompt_token_ids], "completion_ids": [[int(t) for t in c.token_ids] for c in g.completions]}
    if g.metadata.get("behaviour_logprobs", True):  # logged data read without them has zeros there, not log-probs
        rec["behavior_logprobs"] = [[float(x) for x in c.logprobs] for c in g.completions]
    return rec


def write_records(records: Sequence[Dict[str, Any]], out: str) -> None:
    """JSONL, or Parquet for ``.parquet``/``.pq``; written to a temporary file and renamed."""
    tmp = f"{out}.tmp-{os.getpid()}"
    if _is_parquet(out):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(records)), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    os.replace(tmp, out)
