"""One learner step fed by the replay buffer: sample this rank's share, train, acknowledge.

Acknowledging after the step is what makes delivery at-least-once: a learner that dies mid-step
leaves its groups pending, and they are re-delivered (to the same consumer name at once).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

from agro_dist.buffer import ReplayBuffer

from .learner import Learner


def step_from_buffer(learner: Learner, buffer: ReplayBuffer, *, p: Optional[float] = None, timeout_s: Optional[float] = None,
                     replay_groups: Optional[int] = None, batch_index: Optional[int] = None) -> Dict[str, float]:
    """``replay_groups`` of this rank's share replayed (default: the buffer's exact rounding of
    ``p``); ``batch_index`` (the driver's step) keeps the ranks' replayed groups disjoint."""
    per_rank = learner.cfg.batch_groups // learner.world
    t = time.perf_counter()
    batch = buffer.sample(per_rank, p, replay_groups=replay_groups, batch_index=batch_index, current_version=learner.version,
                          timeout_s=timeout_s)
    wait = time.perf_counter() - t
    fresh = [it.staleness for it in batch.items if it.source == "fresh"]
    replayed = [it.staleness for it in batch.items if it.source == "replay"]
    metrics = learner.train_step(batch.groups, staleness=fresh, replay_age=replayed, replay_fraction=batch.replay_fraction, wait_s=wait)
    buffer.ack(batch)
    # What this rank trained on, by source (the driver sums the ranks' counts).
    metrics.update(fresh_groups=float(len(fresh)), replayed_groups=float(len(replayed)),
                   fresh_completions=float(sum(it.group.n for it in batch.items if it.source == "fresh")),
                   replayed_completions=float(sum(it.group.n for it in batch.items if it.source == "replay")))
    return metrics
