"""Example reward functions in the signatures agro_dist accepts (docs/rewards.md), importable on
every node because they ship with the package: ``--generator.reward_fn
agro_dist.tasks.example_rewards:format_reward``. Copy one into your own module to start from.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional

_FINAL = re.compile(r"the final answer is\s*:?\s*\$?-?[\d,]*\d", re.IGNORECASE)


def format_reward(prompts: List[Any], completions: List[Any], **columns) -> List[float]:
    """TRL's batched signature: 1 for a completion that ends its reasoning with "The final answer
    is N" (the form the built-in rewards read first), else 0. ``completions`` are strings, or
    ``[{"role": "assistant", "content": ...}]`` for chat prompts."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if _FINAL.search(t) else 0.0 for t in texts]


def gsm8k_score(data_source: Optional[str], solution_str: str, ground_truth: str, extra_info: Any = None) -> float:
    """verl's ``compute_score`` signature: the number after the last "####" or "The final answer
    is" (else the last number written) against the ground truth."""
    from agro_dist.tasks.rewards import numeric_equal

    tail = re.split(r"####|the final answer is", solution_str, flags=re.IGNORECASE)[-1]
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail) or re.findall(r"-?\d[\d,]*(?:\.\d+)?", solution_str)
    return float(bool(nums) and numeric_equal(nums[0] if len(tail) < len(solution_str) else nums[-1], ground_truth))
