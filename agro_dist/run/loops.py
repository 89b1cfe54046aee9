"""The two training loops: how the learner is fed, step by step, until the run's budget is spent.

- :class:`SyncLoop` (``run.mode: sync``): per step the generators make exactly this step's fresh
  groups with the current weights (the whole batch at p = 0; ``(1 - p)`` of it otherwise, the
  rest replayed from the groups trained on before), the learner trains on them (fresh staleness
  0), and every generator loads the new weights before the next step. At p = 0, on-policy step
  for step; at p > 0, the paper's replay setting.
- :class:`AsyncLoop` (``async``, ``frozen``, ``offline``): each idle generator makes the groups
  the learner will take next (paused while the buffer holds ``max_backlog_groups`` fresh groups,
  one step's fresh groups by default) while the learner trains whenever it has a batch; offline
  runs have no generators and feed the learner the logged file's groups.

The driver plans each step's replayed groups (``Driver.plan_step``), so that the generators make
only what is trained. The loops drive the roles the driver holds: ``d.pool`` (the generators),
``d.learners`` (the ranks), ``d.evaluator``.

A loop holds only what lives across its steps (calls in flight, an evaluation running); the
driver (``agro_dist/run/driver.py``) does the work of a step: ``finish_step`` collects the learner's
answer, counts, broadcasts, writes the row and checkpoints, and rebuilds a learner that failed
(it returns None then, and the loop goes on from the restored step). ``run`` returns once the
budget is spent; the driver calls it again if the learner fails in the final checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Union

import ray


class SyncLoop:
    def __init__(self, d):
        self.d = d
        self.pending_eval = None  # (step, samples, ref) of an evaluation running
        # With generator 0 evaluating on a GPU of its own, an evaluation due after step k starts
        # once step k+1's groups are made, so it runs while the learner trains instead of
        # delaying them. On CPU it takes its turn between steps, as generation does: beside a
        # learner step both use every core and crawl (2-core machine, default run: the learner
        # step beside it 10 s -> 45 s, the evaluation 14 s -> 43 s).
        self.defer_eval = d.evaluator.on_generator and d.cfg.resources.generator_gpus > 0
        self.eval_between = d.cfg.eval_takes_turns() if not d.evaluator.on_generator else not self.defer_eval
        self.eval_due = False

    def run(self, elapsed: Callable[[], float]) -> None:
        d = self.d
        B = d.cfg.learner.batch_groups
        while not d.done(elapsed()):
            plan = d.plan_step()
            d.pool.produce_step(B - sum(plan))  # this step's fresh groups, all with the current version
            step_refs = d.learner_step(plan)
            if self.eval_due:
                self.pending_eval, self.eval_due = d.eval_submit(), False
            while not d.learners.step_over(step_refs, timeout=1.0):
                pass
            row = d.finish_step(step_refs, B * d.cfg.generator.n, elapsed)
            if row is not None:
                after_step(self, row, elapsed)

    def drain(self) -> None:
        pass


class AsyncLoop:
    def __init__(self, d):
        self.d = d
        self.pending_eval = None
        self.defer_eval, self.eval_due = False, False
        # Generator 0 evaluates between its produce calls, beside the learner as generation is;
        # an eval actor without resources of its own runs between the learner's steps.
        self.eval_between = not d.evaluator.on_generator and d.cfg.eval_takes_turns()
        # In-flight produce call -> generator index.
        self.gen_refs: Dict[Any, int] = d.pool.start_calls(min(d.cfg.generator.prompts_per_call, d.cfg.fresh_per_step()))
        self.max_backlog = d.cfg.run.max_backlog_groups or d.cfg.fresh_per_step()

    def run(self, elapsed: Callable[[], float]) -> None:
        d = self.d
        while not d.done(elapsed()):
            if d.cfg.run.mode == "offline":
                step_refs, completions = d.offline_step()
                need = 0
            else:
                plan = d.plan_step()
                step_refs, completions = d.learner_step(plan), d.cfg.learner.batch_groups * d.cfg.generator.n
                # This step's fresh groups (all of them where the window was short: the first step).
                need = d.cfg.learner.batch_groups - sum(plan)
            # Keep the generators busy while the learner trains.
            while True:
                ready, _ = ray.wait(list(self.gen_refs) + step_refs, num_returns=1, timeout=1.0)
                if set(step_refs) & set(ready) and d.learners.step_over(step_refs):
                    break
                d.check_redis()
                for ref in ready:
                    if ref in self.gen_refs:
                        d.pool.outcome(self.gen_refs.pop(ref), ref)
                if len(d.pool):
                    d.pool.refill(self.gen_refs, max(self.max_backlog, need), need)
            row = d.finish_step(step_refs, completions, elapsed)
            if row is not None:
                after_step(self, row, elapsed)

    def drain(self) -> None:
        """Let in-flight generation finish: its groups are in the buffer for a resumed run."""
        for ref in self.gen_refs:
            try:
                ray.get(ref, timeout=120)
            except Exception:
                pass


def after_step(loop, row: Dict[str, Any], elapsed: Callable[[], float]) -> None:
    """Evaluations (a finished one recorded, a due one started) and the step's progress line."""
    d, r = loop.d, loop.d.cfg.run
    if loop.pending_eval is not None and d.evaluator.collect(loop.pending_eval, elapsed(), wait=False) is not None:
        loop.pending_eval = None
    if r.eval_every and d.progress.step % r.eval_every == 0 and loop.pending_eval is None and not d.done(elapsed()):
        if loop.defer_eval:
            loop.eval_due = True
        else:
            ev = d.eval_submit()
            if loop.eval_between:
                # It shares the learner's cores: run it now, between steps. Alongside a learner
                # step both crawl (2-core CPU, offline run: steps 6.5 s -> 40 s, an eval ~4 min).
                d.evaluator.collect(ev, elapsed(), wait=True, retry=False)
            else:
                loop.pending_eval = ev
    d.log_progress(row, elapsed())


def make(d) -> Union[SyncLoop, AsyncLoop]:
    return SyncLoop(d) if d.cfg.run.mode == "sync" else AsyncLoop(d)
