"""The generator actors as the driver drives them: their calls, their counters, their failures.

- **Calls.** Sync mode: ``produce_step`` has them make exactly one step's fresh groups. Async:
  ``refill`` keeps each idle generator making the groups the learner will take next, while fewer
  than a bound of fresh groups wait (generation follows demand). ``broadcast`` sends the learner's
  weights (each loads them between its calls: Ray runs an actor's calls in order).
- **Counters.** Each call returns the generator's running totals (tokens, engine and reward
  seconds, each reward function's sum, timeouts); ``take_window`` gives what came in since the
  last train.csv row.
- **Failures.** A generator whose actor dies is restarted by Ray (``max_restarts``; on another
  node if its own is lost): the pool sends it the latest weights before its next call and says
  when it is back. A call that raises (its actor alive) is made again; one that keeps raising
  stops the run. The groups it had put stay in the buffer either way.

Handed what it needs: the config, the actors (``startup.start_generators``), the buffer's driver
handle, the cluster's ``Placement``, the ``LearnerGroup`` whose weights it sends (its
``weights_to_send`` and ``published_version`` only) and ``check_faults`` (raises when the private
Redis is gone).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import ray

from agro_dist.run.errors import TrainingError, ray_actor_errors
from agro_dist.run.startup import first_line

log = logging.getLogger("agro_dist")

# A generator whose calls raise this many times in a row (its actor alive) stops the run.
GENERATOR_ERRORS_IN_A_ROW = 5


class GeneratorPool:
    def __init__(self, cfg, actors: List[Any], buffer, placement, learners, check_faults: Callable[[], None]):
        self.cfg = cfg
        self.actors = actors
        self.buffer = buffer
        self.placement = placement
        self.learners = learners
        self.check_faults = check_faults
        self.restarts = 0
        self.generated_tokens = 0  # completion tokens made in the run (the cost axis; a checkpoint keeps it)
        self.broadcast_version = 0  # the version last sent to every generator (they start with the model's, 0)
        self.down: set = set()  # generators failed and not yet back (Ray restarting them)
        self._last: Dict[int, tuple] = {}  # generator -> its last (tokens, generate_s, reward_s) counters
        self._window = [0.0, 0.0, 0.0]  # tokens, engine seconds and reward seconds since the last row, all generators
        self._reward_timeouts: Dict[int, int] = {}
        self._reward_errors: Dict[int, int] = {}
        # Each reward function's (sum, count) of values: per generator as last reported, and since the last row.
        self._parts_last: Dict[int, Dict[str, tuple]] = {}
        self._parts_window: Dict[str, List[float]] = {}
        self._errors: Dict[int, int] = {}  # generator -> calls in a row that raised

    def __len__(self) -> int:
        return len(self.actors)

    # ------------------------------------------------------------------ weights

    def send_weights(self, i: int) -> Any:
        """Generator i loads the learner's latest weights before its next call: the call's ref
        (None where there is nothing to send: frozen generators keep the initial weights, and a
        restarted one loads them again; nothing published yet)."""
        if self.cfg.run.mode == "frozen":
            return None
        w = self.learners.weights_to_send()
        return None if w is None else self.actors[i].update_weights.remote(*w)

    def broadcast(self, version: int, *, wait: bool) -> None:
        """Every generator gets the learner's latest weights (``version``). ``wait``: until each
        has loaded them (sync mode); one that died meanwhile is restarted and sent them again."""
        sends = [self.send_weights(i) for i in range(len(self.actors))]
        self.broadcast_version = version
        if not wait:
            return
        for i, ref in enumerate(sends):
            if ref is None:
                continue
            try:
                ray.get(ref)
            except ray_actor_errors() as e:
                self.failed(i, e)
            except ray.exceptions.RayTaskError as e:  # loading the weights raised: a restarted actor loads them again
                raise TrainingError(f"generator {i} could not load version {version}: {first_line(e)}") from None

    # ------------------------------------------------------------------ calls

    def produce_step(self, fresh: int) -> None:
        """Sync mode: the generators make exactly this step's ``fresh`` groups with the current
        weights (the rest of the batch is replayed), shared out as evenly as it goes."""
        G = len(self.actors)

        def calls(n: int) -> Dict[Any, int]:
            return {g.produce.remote(groups=n // G + (i < n % G)): i for i, g in enumerate(self.actors) if n // G + (i < n % G)}

        refs = calls(fresh)
        while refs:
            for ref, i in list(refs.items()):
                del refs[ref]
                self.outcome(i, ref)
            # A generator that died mid-call put some of its groups (or none): top up until the
            # step's fresh groups are complete.
            missing = fresh - self.buffer.stats()["fresh_backlog"]
            if missing > 0:
                refs = calls(missing)

    def start_calls(self, groups: int) -> Dict[Any, int]:
        """Async: one ``produce`` call per generator (in-flight ref -> generator index)."""
        return {g.produce.remote(groups=groups): i for i, g in enumerate(self.actors)}

    def refill(self, gen_refs: Dict[Any, int], max_backlog: int, need: int = 0) -> None:
        """Async: an idle generator makes the groups the learner will take next (one step's fresh
        groups at most per call; ``need``, the running step's, where more) while fewer than
        ``max_backlog`` fresh groups wait: generation follows demand, so at any p nothing within
        the staleness bound is made to be thrown away."""
        busy = set(gen_refs.values())
        idle = [i for i in range(len(self.actors)) if i not in busy]
        if not idle:
            return
        backlog = self.buffer.stats()["fresh_backlog"]
        k = min(self.cfg.generator.prompts_per_call, max(self.cfg.fresh_per_step(), need))
        if k < 1:  # p = 1 with a history: nothing fresh is ever taken
            return
        for i in idle:
            if backlog >= max_backlog:
                break
            gen_refs[self.actors[i].produce.remote(groups=k)] = i
            backlog += k

    def outcome(self, i: int, ref) -> None:
        """The result of generator i's call ``ref``: its counters, or its failure handled."""
        try:
            self.counters(i, ray.get(ref))
        except ray_actor_errors() as e:
            self.failed(i, e)
        except ray.exceptions.RayTaskError as e:
            self._raised(i, e)

    # ------------------------------------------------------------------ counters

    def counters(self, i: int, stats: Dict[str, Any]) -> None:
        """Generator i's running totals as its call returned them: what is new since its last call
        goes into the window (a restarted generator counts from 0 again)."""
        tok, secs, rew = float(stats["tokens"]), float(stats["generate_s"]), float(stats.get("reward_s", 0.0))
        p_tok, p_secs, p_rew = self._last.get(i, (0.0, 0.0, 0.0))
        if tok < p_tok:  # a restarted generator counts from 0
            p_tok, p_secs, p_rew = 0.0, 0.0, 0.0
        self._window[0] += tok - p_tok
        self.generated_tokens += int(tok - p_tok)
        self._window[1] += secs - p_secs
        self._window[2] += rew - p_rew
        self._last[i] = (tok, secs, rew)
        self._reward_timeouts[i] = int(stats.get("reward_timeouts", 0))
        self._reward_errors[i] = int(stats.get("reward_errors", 0))
        last = self._parts_last.get(i, {})
        for name, st in (stats.get("reward_parts") or {}).items():
            p_sum, p_n = last.get(name, (0.0, 0))
            if st["count"] < p_n:  # a restarted generator counts from 0
                p_sum, p_n = 0.0, 0
            w = self._parts_window.setdefault(name, [0.0, 0])
            w[0] += st["sum"] - p_sum
            w[1] += st["count"] - p_n
            last[name] = (st["sum"], st["count"])
        self._parts_last[i] = last
        self._errors[i] = 0
        if i in self.down:
            self.back(i, int(stats.get("version", -1)), stats.get("node"))

    def take_window(self) -> Dict[str, Any]:
        """What the generators did since the last call (a train.csv row's share), and the run's
        totals. Generation speed is tokens per engine second summed over generators, as the
        learner's trained tokens/s is per second of its step."""
        tok, secs, rew = self._window
        parts = {name: (total / n if n else None) for name, (total, n) in self._parts_window.items()}
        self._window, self._parts_window = [0.0, 0.0, 0.0], {}
        return dict(tokens_per_s=len(self.actors) * tok / secs if secs > 0 else None, generate_s=secs, reward_s=rew,
                    reward_parts=parts, generated_tokens=self.generated_tokens, restarts=self.restarts,
                    reward_timeouts=sum(self._reward_timeouts.values()), reward_errors=sum(self._reward_errors.values()))

    # ------------------------------------------------------------------ failures

    def _raised(self, i: int, err: Exception) -> None:
        """A generator's call raised (its actor lives on): a passing fault (the buffer's Redis
        restarting, say) is logged and the call made again; a generator that keeps raising stops
        the run."""
        self.check_faults()
        self._errors[i] = self._errors.get(i, 0) + 1
        if self._errors[i] > GENERATOR_ERRORS_IN_A_ROW:
            raise TrainingError(f"generator {i} raised in {self._errors[i]} calls in a row; last: {first_line(err)}") from None
        log.warning("generator %d's call raised (%s); calling it again (%d in a row)", i, first_line(err), self._errors[i])

    def failed(self, i: int, err: Exception) -> None:
        """Generator i's actor failed: Ray restarts it (on another node if its own is gone). Calls
        made while it restarts fail at once: they are made again, quietly, until it is back."""
        self._last[i] = (0.0, 0.0, 0.0)
        self._parts_last.pop(i, None)
        if i not in self.down:
            self.down.add(i)
            self.restarts += 1
            where = self.placement.where.get(f"generator-{i}")
            log.warning("generator %d%s failed (%s)%s; Ray restarts it, it gets version %d before its next call (%d restart(s) so far)",
                        i, f" (on {where})" if where else "", first_line(err), self.placement.dead_nodes(),
                        self.learners.published_version, self.restarts)
        self.send_weights(i)

    def back(self, i: int, version: int, where: Optional[str]) -> None:
        """Generator i's first call since its restart came back: where it runs (it says, in its
        result; asking Ray's actor table or the actor just after a restart could come back empty:
        the flaky cluster test of issue 37), and the weights version its groups were made with
        (the learner's, sent before the call; not the initial 0)."""
        self.down.discard(i)
        name = f"generator-{i}"
        where = self.placement.note(name, self.actors[i], where)
        log.info("generator %d is back, on %s, generating with version %d (learner at %d)", i, where or "(its node did not say)",
                 version, self.learners.published_version)
