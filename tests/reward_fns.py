"""User reward functions, importable by path (``reward_fns:contains_answer``) in the tests."""


def contains_answer(text, reference, metadata):
    return 1.0 if str(reference) in text else 0.0


def raises(text, reference, metadata):
    raise RuntimeError("this reward function is broken")


def not_finite(text, reference, metadata):
    return float("nan")


def hangs(text, reference, metadata):
    while True:
        pass


def even_length(text, reference, metadata):
    """A reward a random tiny model earns about half the time: gradients in the system tests."""
    return 1.0 if len(text) % 2 == 0 else 0.0


# TRL's batched signature: a group a call, the row's columns as keyword lists.
def trl_contains(prompts, completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    assert len(prompts) == len(texts) == len(answer)
    return [1.0 if a in t else 0.0 for t, a in zip(texts, answer)]


def trl_length_or_none(prompts, completions, **kwargs):
    """None (does not apply) for completions without a digit; else -length/100."""
    return [None if not any(ch.isdigit() for ch in c) else -len(c) / 100 for c in completions]


def trl_chat_echo(prompts, completions, level, **kwargs):
    """Checks the conversational form: prompts are chat turns, completions assistant turns."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    assert all(c[0]["role"] == "assistant" for c in completions)
    return [float(lv) for lv in level]


def trl_wrong_length(prompts, completions, **kwargs):
    return [1.0]


def trl_hangs(prompts, completions, **kwargs):
    while True:
        pass


# verl's compute_score signature: one completion a call, a number or {"score": ...}.
def verl_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0 if solution_str.strip().endswith(ground_truth) else 0.0, "source": data_source}


# verl's built-in form (verl.utils.reward_score.gsm8k.compute_score): no data_source or extra_info.
def verl_builtin_form(solution_str, ground_truth, method="strict", format_score=0.0, score=1.0):
    return score if solution_str.strip().endswith(ground_truth) else format_score
