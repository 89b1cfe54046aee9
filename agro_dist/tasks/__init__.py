"""Tasks and rewards: what a run trains on. The prompts and references (``problems``: the built-in
arithmetic task, MATH/GSM8K files, any JSONL/Parquet/CSV file or saved dataset), logged
generations for offline runs (``logged``), the reward functions and their time-limited workers
(``rewards``, ``reward_worker``), and example user rewards (``example_rewards``)."""
