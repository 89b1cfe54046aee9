"""The run's held-out evaluations: greedy and sampled accuracy of the current weights, before
training, every ``run.eval_every`` steps and at the end; each a row in eval.csv and the model
card's numbers.

Generator 0 evaluates (``Config.eval_on_generator``: sync and async runs by default) with the
weights it has, which are the learner's latest after a broadcast, and sent first where not (async
runs between broadcasts, the final evaluation). Otherwise an eval actor of its own (``actor``:
frozen and offline runs, or ``run.eval_engine separate``) loads the latest weights first.

Handed what it needs: the config, the eval actor (or None), the ``GeneratorPool`` (generator 0,
its weights and failures), the ``LearnerGroup`` (the weights) and the run's ``RunMonitor``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import ray

from agro_dist.run.errors import ray_actor_errors
from agro_dist.run.startup import first_line

log = logging.getLogger("agro_dist")

# An evaluation in flight: (step, completions trained, completions generated, its ObjectRef).
Pending = Tuple[int, int, Optional[int], Any]


class Evaluator:
    def __init__(self, cfg, actor, pool, learners, monitor):
        self.cfg = cfg
        self.actor = actor
        self.pool = pool
        self.learners = learners
        self.monitor = monitor
        self.rows: List[Dict[str, float]] = []

    @property
    def on_generator(self) -> bool:
        return self.actor is None

    @property
    def last(self) -> Optional[Dict[str, float]]:
        return self.rows[-1] if self.rows else None

    def submit(self, step: int, samples: int, generated: Optional[int]) -> Pending:
        """Start an evaluation of the current weights, as of ``step``."""
        return (step, samples, generated, self._call())

    def _call(self) -> Any:
        c = self.cfg.run
        if self.actor is None:
            if self.pool.broadcast_version != self.learners.published_version:
                self.pool.send_weights(0)
            return self.pool.actors[0].evaluate.remote(c.eval_size or None, samples=c.eval_samples, task=self.cfg.eval_task_spec())
        if c.mode in ("offline", "frozen"):  # no per-step broadcast: publish the weights the eval needs
            if not self.learners.latest or self.learners.latest[0] != self.learners.current_version():
                self.learners.publish()
        if self.learners.published_version or self.learners.latest:
            self.actor.update_weights.remote(*self.learners.weights())
        return self.actor.evaluate.remote(c.eval_size or None, samples=c.eval_samples)

    def collect(self, pending: Pending, elapsed: float, *, wait: bool, retry: Optional[bool] = None) -> Optional[Dict[str, float]]:
        """The evaluation's row (None while it runs, without ``wait``). An evaluation lost with its
        generator is said in the log and skipped (an empty dict); one that must exist (``retry``,
        default ``wait``: before and after) runs again once the generator is back (Ray restarts it:
        a new engine, ~20 s; calls meanwhile fail at once), within ``run.startup_timeout_s``."""
        retry = wait if retry is None else retry
        deadline = time.monotonic() + self.cfg.run.startup_timeout_s
        step, samples, generated, ref = pending
        lost = 0
        while True:
            if not wait and not ray.wait([ref], timeout=0)[0]:
                return None
            try:
                res = ray.get(ref)
                break
            except ray_actor_errors() as e:
                lost += 1
                if lost == 1:
                    who = "the eval actor" if self.actor is not None else "generator 0"
                    log.warning("evaluation at step %d lost: %s failed (%s)%s", step, who, first_line(e),
                                "; it runs again once the actor is back" if retry else "")
                if not retry:
                    return {}
                if time.monotonic() > deadline:
                    raise
            time.sleep(2.0)
            try:
                if self.actor is None:  # a restarted generator starts from the model's weights
                    sent = self.pool.send_weights(0)
                    if sent is not None:
                        ray.get(sent)
                ref = self._call()
            except ray_actor_errors():
                pass  # still restarting: the next round submits again
        if self.actor is None and 0 in self.pool.down:  # its first answer since it failed (no training call needed it yet)
            self.pool.back(0, int(res["version"]), None)
        shown = res.pop("sample_completions", None) or []
        row = dict(step=step, samples=samples, generated_samples=generated, elapsed_s=elapsed, **res)
        self.rows.append(row)
        self.monitor.eval(row)
        self.monitor.samples(step, shown)
        log.info("eval at step %d (v%d): sampled %.1f%%, greedy %.1f%% on %d held-out problems", step, int(res["version"]),
                 100 * res["sampled_accuracy"], 100 * res["greedy_accuracy"], int(res["eval_problems"]))
        return row
