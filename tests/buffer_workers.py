"""Processes for the buffer's concurrency and crash tests (run under multiprocessing 'spawn'
or as ``python tests/buffer_workers.py victim URL NAME CONSUMER N``)."""

import json
import random
import sys
import time

from agro_dist.buffer import BufferTimeout, ReplayBuffer
from groups import make_group


def producer(url, name, index, seconds, out_path):
    """Put groups in batches of 1-5 for ``seconds``; write the ids it put."""
    rng = random.Random(index)
    i, end = 0, time.monotonic() + seconds
    with ReplayBuffer(url, name=name) as buf:
        while time.monotonic() < end:
            k = rng.randint(1, 5)
            buf.put([make_group(j, seed=index, generator=f"gen-{index}", tokens=32) for j in range(i, i + k)])
            i += k
            time.sleep(rng.uniform(0, 0.02))
    with open(out_path, "w") as f:
        json.dump([f"g-{index}-{j}" for j in range(i)], f)


def consumer(url, name, index, producers_done, out_path):
    seen = []
    with ReplayBuffer(url, name=name, consumer=f"consumer-{index}", seed=index) as buf:
        while True:
            try:
                b = buf.sample(4, p=0.0, timeout_s=0.3)
            except BufferTimeout:
                if producers_done.is_set() and buf.stats()["fresh_backlog"] == 0:
                    break
                continue
            seen += [g.group_id for g in b.groups]
            buf.ack(b)
        # Groups taken in the timed-out call (kept for the next call) are drained too.
        while buf._carry:
            b = buf.sample(len(buf._carry), p=0.0, timeout_s=0.1)
            seen += [g.group_id for g in b.groups]
            buf.ack(b)
    with open(out_path, "w") as f:
        json.dump(seen, f)


def victim(url, name, consumer_name, n):
    """Take n fresh groups, report their ids, then hang without acking (to be SIGKILLed)."""
    buf = ReplayBuffer(url, name=name, consumer=consumer_name)
    b = buf.sample(n, p=0.0, timeout_s=10)
    print(json.dumps([g.group_id for g in b.groups]), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    _, role, url, name, consumer_name, n = sys.argv
    assert role == "victim"
    victim(url, name, consumer_name, int(n))
