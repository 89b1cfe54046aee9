"""Logged data (issue 10): the file format, its checks (file:line:field, nothing trained on half a
file), tokenisation, scoring at load, Parquet, and groups of any size. Real tokenizer (SmolLM2's),
real reward workers; the offline run itself is in test_system.py."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from agro_dist.io.models import default_model_path
from agro_dist.tasks.logged import LoggedDataError, group_record, load_logged, write_records


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(default_model_path())


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(p)


GOOD = {"prompt": "What is 2 + 2?", "completions": ["4", "5"], "rewards": [1.0, 0.0]}

BAD = [  # (second line of the file, the message expected, load options)
    ('{"prompt": "x", "completions": ["a"], ', "d.jsonl:2: not valid JSON", {}),
    ({"prompt": "x"}, "d.jsonl:2: completions: missing", {}),
    ({"prompt": "x", "completions": "a b", "rewards": [1]}, "d.jsonl:2: completions: expected a non-empty list of strings", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1.0, "1"]}, "d.jsonl:2: rewards[1]: expected a finite number, got '1'", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1.0, True]}, "d.jsonl:2: rewards[1]: expected a finite number", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1.0]}, "d.jsonl:2: rewards: 1 rewards for 2 completions", {}),
    ({"completions": ["a", "b"], "rewards": [1, 0]}, "d.jsonl:2: prompt: give exactly one of 'prompt' (text) and 'messages'", {}),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}], "completions": ["a", "b"], "rewards": [1, 0]},
     "d.jsonl:2: prompt: give exactly one", {}),
    ({"messages": [{"role": "user"}], "completions": ["a", "b"], "rewards": [1, 0]}, "d.jsonl:2: messages: expected a non-empty list", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "score": 3}, "d.jsonl:2: score: unknown field", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "behavior_logprobs": [[-0.1], [-0.2, -0.3, -0.4]]},
     "d.jsonl:2: behavior_logprobs[0]: 1 log-probs for 2 completion tokens", {}),  # "a" + EOS
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "behavior_logprobs": [[-0.1, 0.5], [-0.2, -0.3]]},
     "d.jsonl:2: behavior_logprobs[0]: log-probs must be finite and <= 0", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "completion_ids": [[1, 10**9], [2]]},
     "d.jsonl:2: completion_ids[0]: token id 1000000000 outside the vocabulary", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0]}, "d.jsonl:1: behavior_logprobs: missing: grpo needs",  # the first line lacks them too
     dict(need_behaviour=True, loss="grpo")),
    ({"prompt": "x", "completions": ["a", "b"]}, "d.jsonl:2: rewards: missing, and no reward function", {}),
    ({"prompt": "x", "completions": ["a", "b"]}, "d.jsonl:2: answer: missing", dict(reward_fn="numeric")),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "id": "line 1"}, "d.jsonl:2: id: 'line 1' already used on line 1", {}),
    ({"prompt": "x", "completions": ["a", "b"], "rewards": [1, 0], "finish_reasons": ["stop"]},
     "d.jsonl:2: finish_reasons: 1 entries for 2 completions", {}),
    (["not", "an", "object"], "d.jsonl:2: expected a JSON object", {}),
]


@pytest.mark.parametrize("line,message,opts", BAD, ids=[m.split(": ", 1)[1][:40] for _, m, _ in BAD])
def test_a_bad_record_names_file_line_and_field_and_nothing_is_loaded(tok, tmp_path, line, message, opts):
    path = _write(tmp_path, [GOOD, line, GOOD | {"id": "third"}])
    with pytest.raises(LoggedDataError) as e:
        load_logged(path, tok, **opts)
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)


def test_an_empty_file_and_a_missing_one_are_refused(tok, tmp_path):
    with pytest.raises(LoggedDataError, match="no records"):
        load_logged(_write(tmp_path, ["", "  "]), tok)
    with pytest.raises(LoggedDataError, match="file not found"):
        load_logged(str(tmp_path / "nope.jsonl"), tok)


def test_tokens_scored_are_the_chat_template_then_the_completion_then_eos(tok, tmp_path):
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    path = _write(tmp_path, [
        {"messages": msgs, "completions": ["7", "The final answer is 8"], "rewards": [1, 0], "finish_reasons": ["stop", "length"],
         "answer": "7", "id": "a"},
        {"prompt": "Plain text: 1 + 1 =", "completions": [" 2", " 3", " 11"], "rewards": [1, 0, 0], "id": "b"},
    ])
    (a, b), stats = load_logged(path, tok)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a.prompt == text and list(a.prompt_token_ids) == tok.encode(text)
    # A completion that stopped by itself ends with EOS; one cut at the length limit does not.
    assert list(a.completions[0].token_ids) == tok.encode("7", add_special_tokens=False) + [tok.eos_token_id]
    assert list(a.completions[1].token_ids) == tok.encode("The final answer is 8", add_special_tokens=False)
    assert list(b.prompt_token_ids) == tok.encode("Plain text: 1 + 1 =") and b.n == 3  # groups of any size
    assert a.metadata["behaviour_logprobs"] is False and a.group_id == "logged:d.jsonl:a"
    assert stats == dict(records=2, scored=0, reward_timeouts=0, too_small=0)


def test_missing_rewards_are_scored_once_at_load_by_the_tasks_reward(tok, tmp_path):
    path = _write(tmp_path, [{"prompt": "q", "completions": ["The final answer is 7", "8", "seven"], "answer": "7"}])
    (g,), stats = load_logged(path, tok, reward_fn="numeric")
    assert [c.reward for c in g.completions] == [1.0, 0.0, 0.0] and stats["scored"] == 1


def test_groups_smaller_than_the_loss_needs_are_left_out_and_counted(tok, tmp_path):
    path = _write(tmp_path, [GOOD, {"prompt": "y", "completions": ["1"], "rewards": [1]}])
    groups, stats = load_logged(path, tok, min_group_size=2, loss="agro_off")
    assert len(groups) == 1 and stats["too_small"] == 1
    groups, stats = load_logged(path, tok, min_group_size=1, loss="agro_single")
    assert len(groups) == 2 and stats["too_small"] == 0
    with pytest.raises(LoggedDataError, match="use --learner.loss agro_single"):
        load_logged(_write(tmp_path, [{"prompt": "y", "completions": ["1"], "rewards": [1]}], "one.jsonl"), tok, min_group_size=2)


def test_parquet_holds_the_same_format_and_round_trips(tok, tmp_path):
    groups, _ = load_logged(_write(tmp_path, [GOOD | {"id": "g1", "behavior_logprobs": [[-0.5, -0.1], [-1.0, -0.2]]},
                                              {"prompt": "z", "completions": ["a", "b", "c"], "rewards": [0, 1, 0], "id": "g2"}]), tok)
    out = str(tmp_path / "d.parquet")
    write_records([group_record(g) for g in groups], out)
    again, _ = load_logged(out, tok)
    for g, h in zip(groups, again):
        assert list(h.prompt_token_ids) == list(g.prompt_token_ids) and h.rewards.tolist() == g.rewards.tolist()
        assert [list(c.token_ids) for c in h.completions] == [list(c.token_ids) for c in g.completions]
        assert [x for c in h.completions for x in c.logprobs] == pytest.approx([x for c in g.completions for x in c.logprobs])
        assert h.metadata["behaviour_logprobs"] == g.metadata["behaviour_logprobs"]
    # A bad Parquet row is named by its row number.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "x", "completions": ["a", "b"], "rewards": [1.0, None]}]), str(tmp_path / "b.parquet"))
    with pytest.raises(LoggedDataError, match=r"b.parquet:2: rewards\[1\]: expected a finite number, got None"):
        load_logged(str(tmp_path / "b.parquet"), tok)


def test_the_driver_refuses_a_bad_file_before_anything_starts(tmp_path):
    import os
    import subprocess
    import sys

    path = _write(tmp_path, [GOOD, {"prompt": "x", "completions": ["a", "b"], "rewards": [1.0]}])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "agro_dist", "--run.mode", "offline", "--data.path", path, "--run.output_dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"agro_dist: error: data.path: {path}:2: rewards: 1 rewards for 2 completions" in p.stderr
    assert "Ray" not in p.stdout and not (tmp_path / "agro").exists()  # nothing started, no run folder


def test_prep_writes_gsm8k_in_verls_layout_which_the_dataset_task_reads(tmp_path):
    import pathlib

    from agro_dist.data import main
    from agro_dist.tasks.problems import load_task

    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    assert main(["prep", str(shared), "--preset", "gsm8k", "--out", str(tmp_path / "gsm8k")]) == 0
    t = load_task("dataset", str(tmp_path / "gsm8k"), reward_fn="numeric")
    assert len(t._train) == 7473 and len(t.eval_set()) == 1319 and t.answer_key == "reward_model.ground_truth"
    first = json.loads((shared / "test.jsonl").open().readline())
    p = t.eval_set()[0]
    assert p.answer == first["answer"].split("####")[-1].strip() and p.messages == [{"role": "user", "content": first["question"]}]
    assert p.metadata["data_source"] == "openai/gsm8k" and p.metadata["extra_info"] == {"split": "test", "index": 0}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(SystemExit, match=r"train.jsonl:1: field 'answer': no '#### N' final answer"):
        main(["prep", str(bad), "--preset", "gsm8k", "--out", str(tmp_path / "out")])


def test_logged_batches_run_epoch_after_epoch_each_a_seeded_shuffle_and_resume_from_consumed():
    from agro_dist.tasks.logged import LoggedBatches

    groups = list(range(10))
    b = LoggedBatches(groups, 4, seed=3)
    seen = [b.next() for _ in range(5)]  # 20 groups: two epochs exactly
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == groups and sorted(seen[2][2:] + seen[3] + seen[4]) == groups
    assert seen[0] + seen[1] + seen[2][:2] != seen[2][2:] + seen[3] + seen[4]  # each epoch its own order
    assert b.epochs_done == 2.0
    again = LoggedBatches(groups, 4, seed=3)
    again.consumed = 8  # a checkpoint's cursor
    assert again.next() == seen[2] and again.next() == seen[3]
    assert LoggedBatches(groups, 4, seed=3, shuffle=False).next() == [0, 1, 2, 3]
