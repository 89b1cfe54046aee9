"""A reward worker process: ``python -m agro_dist.tasks.reward_worker SPEC``.

Reads one JSON job per line on stdin (``[texts, reference, metadata, prompt]``: one completion
for a per-completion function, a group for a batched one), writes one JSON reply per line on
stdout (``["ok", [value or null, ...]]`` or ``["error", message]``). Started by ``RewardScorer`` as a
plain subprocess, so it never imports the caller's ``__main__`` (multiprocessing's spawn would),
and killed by it when a call exceeds the time limit.
"""

import json
import logging
import sys


def main() -> int:
    # We time out by killing this process; math-verify's note that its own timeout is off is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from agro_dist.tasks.rewards import call_reward, resolve_reward_fn, reward_kind

    fn = resolve_reward_fn(sys.argv[1])
    kind = reward_kind(fn)
    out = sys.stdout
    sys.stdout = sys.stderr  # a reward function that prints must not corrupt the protocol
    for line in sys.stdin:
        texts, ref, meta, prompt = json.loads(line)
        try:
            reply = ["ok", call_reward(fn, kind, texts, ref, meta, prompt)]
        except Exception as e:  # noqa: BLE001 - any failure of user code scores 0 and is counted
            reply = ["error", f"{type(e).__name__}: {e}"[:500]]
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
