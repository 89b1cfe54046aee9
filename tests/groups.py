"""Test groups: valid records of chosen sizes, built like a generator would build them."""

import numpy as np

from agro_dist.core.records import Completion, Group


def make_group(i: int, *, version: int = 0, n: int = 4, tokens: int = 16, generator: str = "gen-0", seed: int = 0) -> Group:
    rng = np.random.default_rng([seed, i])
    comps = [
        Completion(
            token_ids=rng.integers(0, 50_000, tokens).astype(np.int32),
            logprobs=-rng.exponential(1.0, tokens).astype(np.float32),
            reward=float(rng.integers(0, 2)),
            finish_reason="stop" if j % 2 else "length",
            text=f"completion {j} of group {i}",
        )
        for j in range(n)
    ]
    return Group(
        prompt_id=f"prompt-{i % 97}",
        prompt=f"What is {i} + 1?",
        prompt_token_ids=rng.integers(0, 50_000, 12).tolist(),
        completions=comps,
        policy_version=version,
        generator_id=generator,
        metadata={"answer": str(i + 1), "level": 1},
        group_id=f"g-{seed}-{i}",
    )
