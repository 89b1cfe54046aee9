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
