"""Groups of completions -> tensors for one forward/backward.

A row is ``prompt_token_ids + completion token_ids``, right-padded. Targets are the inputs
shifted by one: position ``j`` predicts token ``j + 1``, so a row's response occupies target
positions ``len(prompt) - 1 .. len(row) - 2``. Rows of a group are contiguous (the losses'
leave-one-out baselines need the group's ``n`` completions together), and a micro-batch holds
whole groups only.

With ``pack`` the learner computes each prompt once rather than n times
(``LearnerConfig.pack``; the padded ``MicroBatch`` stays the reference the tests compare against,
and carries what the losses read: masks, rewards):

- ``prefix``: the prompts as one padded batch (their keys and values kept, with gradient), then
  the completions as rows that attend to their group's prompt through those keys and values,
  position ids continuing from the prompt's end. Attention costs what it must (a completion sees
  its prompt and itself); completions are padded to the longest of the micro-batch.
- ``rows``: each group as ``[prompt, c_1, ..., c_n]``, each completion attending to the whole
  prompt and causally to itself (a 4-D boolean mask, which Hugging Face models take as given and
  pass to SDPA), groups packed into rows of at most ``budget`` tokens (a longer group has a row of
  its own): no padding, but attention is computed over the whole row, which costs more than it
  saves once completions are long (measured in docs/learner.md).

Either way ``src`` maps each response token, in the padded batch's row-major order, to the
position whose hidden state predicts it: the prompt's last token for a completion's first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from agro_dist.core.records import Group

from .config import PACKINGS


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, L] long
    resp_mask: torch.Tensor  # [R, L-1] bool: target positions holding response tokens
    behaviour_logps: torch.Tensor  # [R, L-1] float32, 0 off the response
    rewards: torch.Tensor  # [R] float64
    group_ids: List[str]
    group_sizes: List[int]  # completions of each group, in row order (groups may differ in size)
    has_behaviour: torch.Tensor  # [R] bool: the row's data carries its sampler's log-probs
    packed: Optional[Union["Packed", "Prefixed"]] = None  # the model's input when each prompt is computed once

    @property
    def group_size(self) -> int:
        """The common group size (0 when the groups differ in size)."""
        return self.group_sizes[0] if len(set(self.group_sizes)) == 1 else 0

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @property
    def num_response_tokens(self) -> int:
        return int(self.resp_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def check_groups(groups: Sequence[Group], min_size: int = 1) -> List[int]:
    """Groups need at least ``min_size`` completions and finite rewards; returns their sizes
    (they may differ: logged data)."""
    if not groups:
        raise ValueError("no groups to train on")
    for g in groups:
        if g.n < min_size:
            raise ValueError(f"group {g.group_id}: {g.n} completion(s), this loss needs groups of >= {min_size}")
        r = g.rewards
        if not np.isfinite(r).all():
            raise ValueError(f"group {g.group_id}: non-finite reward {r.tolist()}")
    return [g.n for g in groups]


def has_behaviour_logprobs(g: Group) -> bool:
    """Generators record their sampler's log-probs; logged data may not (then they are zeros)."""
    return bool(g.metadata.get("behaviour_logprobs", True))




def micro_batch_tokens(groups: Sequence[Group], pack: str, *, pack_tokens: int = 1024, pad_multiple: int = 1) -> int:
    """Tokens a micro-batch of ``groups`` puts through the model in layout ``pack``: the size of
    the model's input ``collate`` builds, padding included (``none``: every completion's row, its
    prompt included, padded to the longest; ``prefix``: the prompts padded to the longest prompt
    and the completions to the longest completion; ``rows``: ``_rows_of``'s rows padded to the
    longest). What ``micro_tokens`` bounds: activations and attention grow with it."""
    if not groups:
        return 0
    comps = [len(c.token_ids) for g in groups for c in g.completions]
    if pack == "none":
        L = max(len(g.prompt_token_ids) + len(c.token_ids) for g in groups for c in g.completions)
        return len(comps) * _round_up(max(L, 2), pad_multiple)
    if pack == "prefix":
        return (len(groups) * _round_up(max(len(g.prompt_token_ids) for g in groups), pad_multiple)
                + len(comps) * _round_up(max(max(comps), 1), pad_multiple))
    rows, lengths = _rows_of(groups, pack_tokens)
    return len(rows) * _round_up(max(max(lengths), 1), pad_multiple)


def split_by_tokens(groups: Sequence[Group], budget: int, pack: str, *, pack_tokens: int = 1024, pad_multiple: int = 1) -> List[List[Group]]:
    """Consecutive groups into micro-batches of at most ``budget`` tokens (``micro_batch_tokens``
    with the same layout options); a group over the budget alone is a micro-batch of its own
    (groups are never cut: the leave-one-out baselines need a group's completions together)."""
    out: List[List[Group]] = []
    cur: List[Group] = []
    for g in groups:
        if cur and micro_batch_tokens(cur + [g], pack, pack_tokens=pack_tokens, pad_multiple=pad_multiple) > budget:
            out.append(cur)
            cur = []
        cur.append(g)
    if cur:
        out.append(cur)
    return out


def split_to_count(chunks: Sequence[Sequence[Group]], count: int) -> List[List[Group]]:
    """Split the micro-batches with the most groups in two (the first such, halves in order) until
    there are ``count``: every rank runs the same number of forward/backward passes (ZeRO 1-2
    reduce gradients in each), whatever its groups' lengths."""
    out = [list(c) for c in chunks]
    if count > sum(len(c) for c in out):
        raise ValueError(f"cannot make {count} micro-batches of {sum(len(c) for c in out)} groups")
    while len(out) < count:
        i = max(range(len(out)), key=lambda k: len(out[k]))
        c, h = out[i], len(out[i]) // 2
        out[i:i + 1] = [c[:h], c[h:]]
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(groups: Sequence[Group], *, pad_id: int = 0, pad_to: Optional[int] = None, pad_multiple: int = 1,
            pack: str = "none", pack_tokens: int = 1024) -> MicroBatch:
    """Pad whole groups into one micro-batch (``pad_to``: a minimum padded length;
    ``pad_multiple``: round the padded length up to a multiple, e.g. 64 on GPUs). ``pack``: also
    lay them out for the model with each prompt once: ``prefix`` (``_prefix``) or ``rows``
    (``_pack_rows``, rows of at most ``pack_tokens``); ``none``: the padded rows are the model's input."""
    if pack not in PACKINGS:
        raise ValueError(f"pack must be one of {', '.join(PACKINGS)}, got {pack!r}")
    sizes = check_groups(groups)
    rows = []
    for g in groups:
        p = np.asarray(g.prompt_token_ids, dtype=np.int64)
        if len(p) == 0:
            raise ValueError(f"group {g.group_id}: empty prompt (the first response token needs a position to be predicted from)")
        for c in g.completions:
            rows.append((p, np.asarray(c.token_ids, dtype=np.int64), np.asarray(c.logprobs, dtype=np.float32), float(c.reward)))
    L = max(len(p) + len(t) for p, t, _, _ in rows)
    L = _round_up(max(L, pad_to or 0, 2), pad_multiple)
    R = len(rows)
    ids = np.full((R, L), pad_id, dtype=np.int64)
    attn = np.zeros((R, L), dtype=np.int64)
    resp = np.zeros((R, L - 1), dtype=bool)
    beh = np.zeros((R, L - 1), dtype=np.float32)
    for i, (p, t, lp, _) in enumerate(rows):
        lp_len, T = len(p), len(t)
        ids[i, :lp_len] = p
        ids[i, lp_len:lp_len + T] = t
        attn[i, :lp_len + T] = 1
        resp[i, lp_len - 1:lp_len - 1 + T] = True
        beh[i, lp_len - 1:lp_len - 1 + T] = lp
    return MicroBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn),
        resp_mask=torch.from_numpy(resp),
        behaviour_logps=torch.from_numpy(beh),
        rewards=torch.tensor([r for *_, r in rows], dtype=torch.float64),
        group_ids=[g.group_id for g in groups],
        group_sizes=sizes,
        has_behaviour=torch.tensor([has_behaviour_logprobs(g) for g in groups for _ in range(g.n)], dtype=torch.bool),
        packed=(_prefix(groups, pad_id=pad_id, pad_multiple=pad_multiple) if pack == "prefix" else
                _pack_rows(groups, budget=pack_tokens, pad_id=pad_id, pad_multiple=pad_multiple) if pack == "rows" else None),
    )


@dataclass
class Packed:
    input_ids: torch.Tensor  # [B, T] long
    position_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, 1, T, T] bool: query t may attend to key u
    src: torch.Tensor  # [N] long: flat index (b * T + t) of the hidden state predicting each response token


def _rows_of(groups: Sequence[Group], budget: int) -> Tuple[List[List[Group]], List[int]]:
    """The ``rows`` layout's rows (consecutive groups while they fit in ``budget`` tokens, a longer
    group alone) and their lengths in tokens."""
    rows: List[List[Group]] = [[]]
    lengths = [0]
    for g in groups:
        size = len(g.prompt_token_ids) + g.num_tokens()
        if rows[-1] and lengths[-1] + size > budget:
            rows.append([])
            lengths.append(0)
        rows[-1].append(g)
        lengths[-1] += size
    return rows, lengths


def _pack_rows(groups: Sequence[Group], *, budget: int, pad_id: int = 0, pad_multiple: int = 1) -> Packed:
    """Each group once, ``[prompt, c_1, ..., c_n]``, groups packed into rows of at most ``budget``
    tokens (the groups are ``collate``'s, already checked)."""
    rows, lengths = _rows_of(groups, budget)
    T = _round_up(max(max(lengths), 1), pad_multiple)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    pos = np.zeros((B, T), dtype=np.int64)
    attn = np.zeros((B, T, T), dtype=bool)
    causal = np.tril(np.ones((T, T), dtype=bool))
    src: List[np.ndarray] = []
    for b, row in enumerate(rows):
        o = 0
        for g in row:
            p = np.asarray(g.prompt_token_ids, dtype=np.int64)
            P = len(p)
            ids[b, o:o + P] = p
            pos[b, o:o + P] = np.arange(P)
            attn[b, o:o + P, o:o + P] = causal[:P, :P]
            s = o + P
            for c in g.completions:
                t = np.asarray(c.token_ids, dtype=np.int64)
                L = len(t)
                ids[b, s:s + L] = t
                pos[b, s:s + L] = np.arange(P, P + L)
                attn[b, s:s + L, o:o + P] = True  # the whole prompt
                attn[b, s:s + L, s:s + L] = causal[:L, :L]  # itself, causally
                # token 0 is predicted by the prompt's last position, token j by the completion's j - 1
                src.append(b * T + np.concatenate([[o + P - 1], np.arange(s, s + L - 1)])[:L])
                s += L
            o = s
        attn[b, np.arange(o, T), np.arange(o, T)] = True  # padding sees itself (never an all-masked row)
    return Packed(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        attention_mask=torch.from_numpy(attn)[:, None],
        src=torch.from_numpy(np.concatenate(src) if src else np.zeros(0, dtype=np.int64)),
    )


@dataclass
class Prefixed:
    """Each group's prompt once, then its completions as rows over the prompt's keys and values."""
    prompt_ids: torch.Tensor  # [G, P] long, right-padded
    prompt_mask: torch.Tensor  # [G, P] long
    ids: torch.Tensor  # [R, L] long: completions, right-padded
    attention_mask: torch.Tensor  # [R, P + L] long: the row's prompt (not its padding), then its tokens
    position_ids: torch.Tensor  # [R, L] long: continuing from the prompt's end
    row_group: torch.Tensor  # [R] long: the group (prompt row) of each completion row
    src: torch.Tensor  # [N] long: index into cat(prompt hidden [G*P], completion hidden [R*L]) per response token


def _prefix(groups: Sequence[Group], *, pad_id: int = 0, pad_multiple: int = 1) -> Prefixed:
    """The prompts as one padded batch, the completions as another that attends to them (the
    groups are ``collate``'s, already checked)."""
    G = len(groups)
    P = _round_up(max(len(g.prompt_token_ids) for g in groups), pad_multiple)
    comps = [(gi, np.asarray(c.token_ids, dtype=np.int64)) for gi, g in enumerate(groups) for c in g.completions]
    L = _round_up(max(max(len(t) for _, t in comps), 1), pad_multiple)
    R = len(comps)
    pids = np.full((G, P), pad_id, dtype=np.int64)
    pmask = np.zeros((G, P), dtype=np.int64)
    for gi, g in enumerate(groups):
        p = np.asarray(g.prompt_token_ids, dtype=np.int64)
        pids[gi, :len(p)] = p
        pmask[gi, :len(p)] = 1
    ids = np.full((R, L), pad_id, dtype=np.int64)
    attn = np.zeros((R, P + L), dtype=np.int64)
    pos = np.zeros((R, L), dtype=np.int64)
    src: List[np.ndarray] = []
    for r, (gi, t) in enumerate(comps):
        Pg, T = int(pmask[gi].sum()), len(t)
        ids[r, :T] = t
        attn[r, :P] = pmask[gi]
        attn[r, P:P + T] = 1
        pos[r] = np.arange(Pg, Pg + L)
        # token 0 is predicted by the prompt's last position, token j by the completion's j - 1
        src.append(np.concatenate([[gi * P + Pg - 1], G * P + r * L + np.arange(T - 1)])[:T])
    return Prefixed(
        prompt_ids=torch.from_numpy(pids), prompt_mask=torch.from_numpy(pmask), ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn), position_ids=torch.from_numpy(pos),
        row_group=torch.tensor([gi for gi, _ in comps], dtype=torch.long),
        src=torch.from_numpy(np.concatenate(src) if src else np.zeros(0, dtype=np.int64)),
    )
