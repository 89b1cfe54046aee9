"""Rewards on real MATH-500 and GSM8K answers (read from ../shared/data), time limits, and the
guarantee that model output never reaches eval."""

from __future__ import annotations

import json
import os
import pathlib
import random
import time

import pytest

from agro_dist.tasks.rewards import RewardScorer, extract_answer, math_equal, math_reward, numeric_reward, resolve_reward_fn

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def records(path, k, seed=0):
    rows = [json.loads(line) for line in open(DATA / path)]
    return random.Random(seed).sample(rows, k)


def test_extraction():
    assert extract_answer("so 2+2=4. The final answer is $4$.") == "4"
    assert extract_answer("The final answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_answer("... hence \\boxed{x^{2}} and that's it") == "x^{2}"
    assert extract_answer("The final answer is 3. The final answer is 5.") == "5"  # the last commitment
    assert extract_answer("no commitment here, 42") is None


def test_math500_reference_answers_score_1_and_other_answers_0():
    rows = records("math500/test.jsonl", 60)
    ok, wrong_ok = 0, 0
    for i, r in enumerate(rows):
        ans = r["answer"]
        ok += math_reward(f"Step by step... The final answer is ${ans}$.", ans) == 1.0
        other = rows[(i + 1) % len(rows)]["answer"]
        if not math_equal(other, ans) and other.strip() != ans.strip():
            wrong_ok += math_reward(f"The final answer is ${other}$.", ans) == 0.0
    print(f"\nMATH-500: {ok}/60 reference answers score 1; {wrong_ok} other answers score 0")
    assert ok == 60
    assert wrong_ok >= 55


@pytest.mark.parametrize("form", ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac{1}{2}", "\\boxed{\\frac12}", ".5"])
def test_equivalent_forms_of_one_half(form):
    assert math_reward(f"The final answer is {form}.", "\\frac{1}{2}") == 1.0
    assert math_reward(f"The final answer is {form}.", "\\frac{1}{3}") == 0.0


def test_math_answers_rewritten_in_equivalent_forms():
    """Reference answers from MATH-500 that are fractions or integers, rewritten."""
    rows = [json.loads(line) for line in open(DATA / "math500" / "test.jsonl")]
    fracs = [r["answer"] for r in rows if r["answer"].startswith("\\frac{") and r["answer"].count("{") == 2][:10]
    ints = [r["answer"] for r in rows if r["answer"].lstrip("-").isdigit()][:10]
    assert len(fracs) >= 5 and len(ints) == 10
    for f in fracs:
        a, b = f[len("\\frac{"):].split("}{")
        b = b.rstrip("}")
        assert math_reward(f"The final answer is {a}/{b}.", f) == 1.0, f
        assert math_reward(f"The final answer is \\dfrac{{{a}}}{{{b}}}.", f) == 1.0, f
    for n in ints:
        assert math_reward(f"The final answer is {n}.", n) == 1.0
        assert math_reward(f"The final answer is {int(n)}.0", n) == 1.0
        assert math_reward(f"The final answer is {int(n) + 1}", n) == 0.0


def test_gsm8k_answers_with_thousands_commas():
    rows = records("gsm8k/test.jsonl", 80)
    for r in rows:
        ref = r["answer"].split("####")[-1].strip()
        n = int(ref.replace(",", ""))
        assert numeric_reward(f"The final answer is {n:,}.", ref) == 1.0
        assert numeric_reward(f"The final answer is ${n}", ref) == 1.0
        assert numeric_reward(f"so she makes {n} dollars", ref) == 1.0  # no commitment: the last number
        assert numeric_reward(f"The final answer is {n + 1}.", ref) == 0.0
    comma = [r for r in (json.loads(x) for x in open(DATA / "gsm8k" / "test.jsonl")) if "," in r["answer"].split("####")[-1]]
    assert len(comma) == 14
    ref = comma[0]["answer"].split("####")[-1].strip()
    assert numeric_reward(f"The final answer is {ref.replace(',', '')}.", ref) == 1.0


def test_pathological_inputs_return_within_the_time_limit_and_are_counted():
    with RewardScorer("math", timeout_s=2.0) as s:
        texts = [
            "The final answer is 10^{10^{10^{10^{10}}}}.",  # sympy evaluates the power tower
            "The final answer is " + "(" * 400 + "1" + ")" * 400 + ".",  # deeply nested
            "The final answer is \\frac{1}{2}.",
        ]
        t = time.monotonic()
        scores = s.score(texts, "\\frac{1}{2}")
        took = time.monotonic() - t
    print(f"\npathological batch scored {scores} in {took:.1f}s; {s.stats.timeouts} timeouts, {s.stats.errors} errors")
    assert scores[2] == 1.0 and scores[0] == 0.0 and scores[1] == 0.0
    assert s.stats.timeouts >= 1
    assert took < 3 * (2.0 + 3.0)  # each call bounded by the limit plus a worker restart


def test_model_output_never_reaches_eval(tmp_path):
    payload = lambda f: f"__import__('os').system('touch {f}')"  # noqa: E731
    # The danger is real: SymPy's parse_expr (math-verify's plain-expression path) runs it.
    from sympy.parsing.sympy_parser import parse_expr

    canary = tmp_path / "parse_expr_ran_it"
    try:
        parse_expr(payload(canary))
    except Exception:
        pass
    assert canary.exists(), "the test lost its power: parse_expr no longer executes code"
    target = tmp_path / "pwned"
    texts = [f"The final answer is {payload(target)}", f"The final answer is \\boxed{{{payload(target)}}}", payload(target)]
    with RewardScorer("math", timeout_s=5.0) as s:
        assert s.score(texts, "987654321") == [0.0, 0.0, 0.0]  # not a number in the payload
    with RewardScorer("numeric", timeout_s=5.0) as s:
        assert s.score(texts, "987654321") == [0.0, 0.0, 0.0]  # not a number in the payload
    assert not target.exists()


def test_user_reward_functions_by_import_path():
    here = os.path.dirname(__file__)
    with RewardScorer("reward_fns:contains_answer", timeout_s=5.0) as s:
        assert s.score(["it is 42", "it is 41"], "42") == [1.0, 0.0]
    for spec, what in (("reward_fns:raises", "errors"), ("reward_fns:not_finite", "errors"), ("reward_fns:hangs", "timeouts")):
        with RewardScorer(spec, timeout_s=1.0) as s:
            assert s.score(["x"], "1") == [0.0]
            assert getattr(s.stats, what) == 1, spec
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward_fn("reward_fns:missing")
    with pytest.raises(ValueError, match="use one of"):
        resolve_reward_fn("maths")
    assert here  # reward_fns is importable because tests/ is on the path (pytest rootdir)


def test_trl_batched_and_verl_signatures_several_functions_with_weights():
    from agro_dist.tasks.rewards import reward_kind, reward_parts

    assert [reward_kind(resolve_reward_fn(s)) for s in ("math", "reward_fns:contains_answer", "reward_fns:trl_contains",
                                                        "reward_fns:verl_score")] == ["completion", "completion", "batched", "verl"]
    texts = ["it is 42", "it is 41", "no digits here"]
    with RewardScorer("reward_fns:trl_contains", timeout_s=5.0) as s:
        assert s.score(texts, "42", {"answer": "42"}, "What is 6 x 7?") == [1.0, 0.0, 0.0]
        assert s.stats.calls == 1  # one call for the group
    with RewardScorer("reward_fns:verl_score", timeout_s=5.0) as s:
        assert s.score(texts, "41", {"data_source": "mine"}) == [0.0, 1.0, 0.0]
    with RewardScorer("reward_fns:verl_builtin_form", timeout_s=5.0) as s:  # takes only the arguments it names
        assert s.score(texts, "41", {"data_source": "mine"}) == [0.0, 1.0, 0.0] and s.stats.errors == 0
    # Several functions: the weighted sum, each function's mean kept apart; None adds 0 and is counted.
    spec = ["reward_fns:contains_answer", {"fn": "reward_fns:trl_length_or_none", "weight": 0.5, "name": "short"}, "numeric"]
    assert [p.name for p in reward_parts(spec)] == ["contains_answer", "short", "numeric"]
    with RewardScorer(spec, timeout_s=5.0) as s:
        got = s.score(texts, "42", {"answer": "42"}, "q")
        assert got == pytest.approx([1 + 0.5 * -0.08 + 1, 0.5 * -0.08, 0.0])
        parts = s.part_stats()
        assert parts["contains_answer"]["sum"] == 1.0 and parts["contains_answer"]["count"] == 3
        assert parts["short"]["not_applicable"] == 1 and parts["short"]["sum"] == pytest.approx(-0.16)
        assert parts["numeric"]["sum"] == 1.0 and s.stats.errors == 0
    # Chat prompts reach a batched function in TRL's conversational form, with the row's columns.
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    with RewardScorer("reward_fns:trl_chat_echo", timeout_s=5.0) as s:
        assert s.score(["a", "b"], "1", {"level": 3}, chat) == [3.0, 3.0] and s.stats.errors == 0
    # A wrong-length answer, a hang: the group scores 0, counted; a bad spec is refused by name.
    with RewardScorer("reward_fns:trl_wrong_length", timeout_s=5.0) as s:
        assert s.score(["a", "b"], "1") == [0.0, 0.0] and s.stats.errors == 1
        assert "must return a list of 2 values" in s.stats.last_errors[0]
    with RewardScorer("reward_fns:trl_hangs", timeout_s=0.5) as s:
        t = time.monotonic()
        assert s.score(["a", "b"], "1") == [0.0, 0.0] and s.stats.timeouts == 1
        assert time.monotonic() - t < 0.5 * 2 + 5  # the group's limit (0.5 s per completion) plus a restart
    from agro_dist.run.monitor import TRAIN_COLUMNS
    from agro_dist.tasks.rewards import _RESERVED_COLUMNS

    assert {c for c in TRAIN_COLUMNS if c.startswith("reward_")} == set(_RESERVED_COLUMNS)
    for bad, msg in (([], "the list is empty"), ([{"fn": "math", "weight": "x"}], "weight must be a number"),
                     ([{"func": "math"}], "expected 'pkg.module:function'"), (["reward_fns:missing"], "cannot be imported"),
                     ([{"fn": "math", "name": "mean"}], "would make the column reward_mean, which train.csv has already")):
        with pytest.raises(ValueError, match=msg):
            RewardScorer(bad)
