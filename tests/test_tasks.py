"""Tasks: seeded arithmetic with a fixed held-out split, loaders for the shared data, prompts."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest

from agro_dist.tasks.problems import ArithmeticTask, JsonlTask, format_prompt, load_task

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def test_arithmetic_levels_answers_and_seeding():
    t = ArithmeticTask(levels=(1, 2, 3, 4))
    probs = list(itertools.islice(t.train(seed=3), 400))
    assert probs == list(itertools.islice(ArithmeticTask(levels=(1, 2, 3, 4)).train(seed=3), 400))  # seeded
    assert probs != list(itertools.islice(t.train(seed=4), 400))
    levels = {p.metadata["level"] for p in probs}
    assert levels == {1, 2, 3, 4}
    for p in probs:
        nums = [int(x) for x in p.question.replace("?", "").split() if x.lstrip("-").isdigit()]
        want = {1: lambda a, b: a + b, 2: lambda a, b: a + b, 3: lambda a, b: a * b, 4: lambda a, b, c: a + b - c}[p.metadata["level"]](*nums)
        assert p.answer == str(want)
        if p.metadata["level"] == 1:
            assert all(0 <= x <= 9 for x in nums)


def test_arithmetic_held_out_split_is_fixed_and_disjoint():
    t = ArithmeticTask(levels=(1,))
    ev = t.eval_set()
    assert ev == ArithmeticTask(levels=(1,)).eval_set()
    assert 10 <= len(ev) <= 35  # ~20% of the 100 one-digit sums, all distinct
    train_q = {p.question for p in itertools.islice(t.train(seed=0), 3000)}
    assert not train_q & {p.question for p in ev}
    assert len(train_q) + len(ev) == 100
    assert len(ArithmeticTask(levels=(2,)).eval_set(150)) == 150
    # Level 3 has 720 problems: asking for more than its held-out ~20% gives all of them, once.
    l3 = ArithmeticTask(levels=(3,)).eval_set(500)
    assert 100 < len(l3) < 200 and len({p.question for p in l3}) == len(l3)


def test_math500_gsm8k_math_loaders(caplog):
    m5 = load_task("math500", str(DATA / "math500" / "test.jsonl"))
    assert m5.reward_fn == "math" and len(m5._train) + len(m5._eval) == 500
    gsm = load_task("gsm8k", str(DATA / "gsm8k"))
    assert len(gsm._train) == 7473 and len(gsm.eval_set()) == 1319 and gsm.reward_fn == "numeric"
    first = json.loads(open(DATA / "gsm8k" / "test.jsonl").readline())
    assert gsm.eval_set()[0].answer == first["answer"].split("####")[-1].strip()
    assert sum("," in p.answer for p in gsm.eval_set()) == 14  # thousands commas kept in the reference
    math = load_task("math", str(DATA / "math"))
    # The 2 upstream records with an empty \boxed{} are skipped, each named in a warning.
    assert len(math._train) == 7498 and len(math.eval_set()) == 5000
    assert caplog.text.count("field 'answer' is empty") == 2 and "train.jsonl:5530" in caplog.text
    assert math.eval_set()[0].id.startswith("test/")
    p = next(math.train(seed=0))
    assert p.metadata["answer"] == p.answer and "level" in p.metadata


def test_bad_jsonl_names_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer' missing"):
        JsonlTask(str(f))
    f.write_text('{"problem": "1+1", "answer": "2"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        JsonlTask(str(f))
    f.write_text('{"question": "q", "answer": "no final answer"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer': no '#### N' final answer"):
        load_task("gsm8k", str(f))
    with pytest.raises(FileNotFoundError):
        load_task("math500", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu")


def test_prompt_uses_the_models_chat_template():
    from transformers import AutoTokenizer

    from agro_dist.io.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    task = ArithmeticTask()
    p = task.eval_set(1)[0]
    text = format_prompt(tok, p, task.instruction)
    assert p.question in text and "Answer with just the number." in text
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))


def test_dataset_task_reads_jsonl_parquet_csv_and_a_folder_by_split(tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "level": i % 3} for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_parquet(tmp_path / "d.parquet", rows)
    (tmp_path / "d.csv").write_text("prompt,answer,level\n" + "".join(f"\"{r['prompt']}\",{r['answer']},{r['level']}\n" for r in rows))
    seen = {}
    for f in ("d.jsonl", "d.parquet", "d.csv"):
        t = load_task("dataset", str(tmp_path / f))
        assert len(t._train) + len(t.eval_set()) == 60 and 0 < len(t.eval_set()) < 20  # a hashed tenth held out
        assert t.instruction == "" and t.reward_fn == "math"
        seen[f] = sorted((p.question, p.answer) for p in t._train + t.eval_set())
        p = next(p for p in t._train if p.question == "What is 4 + 1?")
        assert p.answer == "5" and p.metadata["level"] in (1, "1") and "prompt" not in p.metadata
    assert seen["d.jsonl"] == seen["d.parquet"] == seen["d.csv"] == sorted((r["prompt"], r["answer"]) for r in rows)
    folder = tmp_path / "split"
    folder.mkdir()
    _write_parquet(folder / "train.parquet", rows[:50])
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    t = load_task("dataset", str(folder))
    assert len(t._train) == 50 and [p.answer for p in t.eval_set()] == [r["answer"] for r in rows[50:]]
    t = load_task("dataset", str(tmp_path / "d.jsonl"), eval_path=str(folder / "test.jsonl"))
    assert len(t._train) == 60 and len(t.eval_set()) == 10  # the held-out set from a second file


def test_dataset_task_reads_verls_parquet_layout_and_chat_prompts(tmp_path):
    rows = [{"data_source": "openai/gsm8k", "ability": "math",
             "prompt": [{"role": "user", "content": f"Tom has {i} apples and buys 2. How many? Output the answer after ####."}],
             "reward_model": {"style": "rule", "ground_truth": str(i + 2)}, "extra_info": {"split": "train", "index": i}}
            for i in range(40)]
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    _write_parquet(folder / "train.parquet", rows[:30])
    _write_parquet(folder / "test.parquet", rows[30:])
    t = load_task("dataset", str(folder), system_prompt="You are a careful solver.")
    assert t.answer_key == "reward_model.ground_truth" and len(t._train) == 30 and len(t.eval_set()) == 10
    p = t.eval_set()[0]
    assert p.answer == "32" and p.messages == rows[30]["prompt"] and p.question == rows[30]["prompt"][0]["content"]
    assert p.metadata["data_source"] == "openai/gsm8k" and p.metadata["extra_info"] == {"split": "train", "index": 30}
    from transformers import AutoTokenizer

    from agro_dist.io.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    text = t.prompt(tok, p)
    assert text.startswith("<|im_start|>system\nYou are a careful solver.<|im_end|>") and p.question in text
    assert text.rstrip().endswith("<|im_start|>assistant") and text.count("<|im_start|>user") == 1
    # the data's own system turn and task_options.system_prompt: one too many, named
    rows[0]["prompt"] = [{"role": "system", "content": "be brief"}] + rows[0]["prompt"]
    _write_parquet(folder / "train.parquet", rows[:30])
    with pytest.raises(ValueError, match=r"train.parquet row 0: field 'prompt' has its own system turn"):
        load_task("dataset", str(folder), system_prompt="You are a careful solver.")
    t = load_task("dataset", str(folder))
    assert t.prompt(tok, t._train[0]).startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_chat_options_system_prompt_template_override_and_raw(tmp_path):
    from transformers import AutoTokenizer

    from agro_dist.io.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    t = load_task("arithmetic", levels=[1], raw_prompt=True)
    p = t.eval_set(1)[0]
    assert t.prompt(tok, p) == f"{p.question}\n\nAnswer with just the number."
    assert load_task("arithmetic", levels=[1], raw_prompt=True, instruction="").prompt(tok, p) == p.question
    assert "The final answer is" in load_task("arithmetic", levels=[1], instruction="paper").prompt(tok, p)
    tpl = tmp_path / "plain.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")
    for spec in (str(tpl), tpl.read_text()):
        t = load_task("arithmetic", levels=[1], chat_template=spec, system_prompt="Be exact.")
        assert t.prompt(tok, p) == f"[system] Be exact.\n[user] {p.question}\n\nAnswer with just the number.\n[assistant] "
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        load_task("arithmetic", chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="no such file"):
        load_task("arithmetic", chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="raw_prompt writes no chat template"):
        load_task("arithmetic", raw_prompt=True, system_prompt="x")


def test_dataset_task_bad_rows_are_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    cases = [
        ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n', r"bad.jsonl:2: field 'answer' missing"),
        ('{"prompt": "1+1", "answer": "2"}\n{"prompt": 7, "answer": "2"}\n', r"bad.jsonl:2: field 'prompt' must be a non-empty string"),
        ('{"prompt": [{"role": "robot", "content": "hi"}], "answer": "2"}\n', r"bad.jsonl:1: field 'prompt' turn 0: expected"),
        ('{"prompt": [{"role": "system", "content": "hi"}], "answer": "2"}\n', r"bad.jsonl:1: field 'prompt' has no user turn"),
        ('{"question": "1+1", "answer": "2"}\n', r"bad.jsonl:1: field 'prompt' missing \(columns: \['answer', 'question'\]"),
        ('{"prompt": "1+1", "label": "2"}\n', r"bad.jsonl:1: no answer column"),
        ('{"prompt": "1+1", "answer": {"x": 1}}\n', r"bad.jsonl:1: field 'answer' must be a non-empty string or number"),
        ('{"prompt": "1+1", "answer": "2"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
    ]
    for text, msg in cases:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_task("dataset", str(f))
    f.write_text('{"q": "1+1", "sol": {"value": "2"}}\n')
    assert load_task("dataset", str(f), prompt_key="q", answer_key="sol.value", eval_fraction=0)._train[0].answer == "2"
    _write_parquet(tmp_path / "bad.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}])
    with pytest.raises(ValueError, match=r"bad.parquet row 1: field 'prompt' must be a non-empty string"):
        load_task("dataset", str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError, match="task data not found"):
        load_task("dataset", str(tmp_path / "nowhere" / "train.parquet"))


def test_saved_and_hub_datasets(tmp_path, monkeypatch):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"q": [f"What is {i} + 1?" for i in range(30)], "a": [str(i + 1) for i in range(30)]}),
        "test": datasets.Dataset.from_dict({"q": ["What is 9 + 9?"], "a": ["18"]}),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    t = load_task("dataset", str(tmp_path / "ds"), prompt_key="q", answer_key="a", reward_fn="numeric")
    assert len(t._train) == 30 and [p.answer for p in t.eval_set()] == ["18"] and t.reward_fn == "numeric"
    bad = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["x"], "a": [""]})})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad\[train\] row 0: field 'a' must be a non-empty string"):
        load_task("dataset", str(tmp_path / "bad"), prompt_key="q", answer_key="a")
    # A hub name where the hub cannot be reached: refused at once, with what to do instead.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a local file or folder, and the Hugging Face hub is not reachable.*HF_HUB_OFFLINE"):
        load_task("dataset", "openai/gsm8k")
