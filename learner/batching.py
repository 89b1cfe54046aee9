"""Groups of completions -> padded tensors for one forward/backward.

A row is ``prompt_token_ids + completion token_ids``, right-padded. Targets are the inputs
shifted by one: position ``j`` predicts token ``j + 1``, so a row's response occupies target
positions ``len(prompt) - 1 .. len(row) - 2``. Rows of a group are contiguous (the losses'
leave-one-out baselines need the group's ``n`` completions together), and a micro-batch holds
whole groups only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from agro_dist.records import Group


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


def collate(groups: Sequence[Group], *, pad_id: int = 0, pad_to: Optional[int] = None, pad_multiple: int = 1) -> MicroBatch:
    """Pad whole groups into one micro-batch (``pad_to``: a minimum padded length;
    ``pad_multiple``: round the padded length up to a multiple, e.g. 64 on GPUs)."""
    sizes = check_groups(groups)
    rows = []
    for g in groups:
        p = np.asarray(g.prompt_token_ids, dtype=np.int64)
        if len(p) == 0:
            raise ValueError(f"group {g.group_id}: empty prompt (the first response token needs a position to be predicted from)")
        for c in g.completions:
            rows.append((p, np.asarray(c.token_ids, dtype=np.int64), np.asarray(c.logprobs, dtype=np.float32), float(c.reward)))
    L = max(len(p) + len(t) for p, t, _, _ in rows)
    L = max(L, pad_to or 0, 2)
    L = -(-L // pad_multiple) * pad_multiple
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
    )
