"""``python -m agro_dist.data``: logged generations for offline training (``sample``) and prompts
for training in verl's layout (``prep``). The format and its reader are
``agro_dist.tasks.logged`` (docs/data.md).

    python -m agro_dist.data sample --model default --task arithmetic --n 4 --prompts 256 --out pi_ref.jsonl
    python -m agro_dist --run.mode offline --data.path pi_ref.jsonl --run.epochs 3
    python -m agro_dist.data prep ../shared/data/gsm8k --preset gsm8k --out data/gsm8k
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional

from agro_dist.tasks.logged import group_record, write_records

# ---------------------------------------------------------------------------- the command


def _sample(args) -> int:
    from agro_dist.actors.generator import Generator

    opts = json.loads(args.task_options) if args.task_options else {}
    gen = Generator(dict(model=args.model, task=args.task, task_path=args.task_path, task_options=opts, reward_fn=args.reward_fn,
                         n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, prompts_per_call=args.batch,
                         seed=args.seed, max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, generator_id="sample"))
    records, t = [], time.perf_counter()
    try:
        while len(records) < args.prompts:
            for g in gen.generate(min(args.batch, args.prompts - len(records))):
                records.append(group_record(g, f"{len(records)}:{g.prompt_id}"))  # a prompt may be drawn twice
    finally:
        gen.close()
    write_records(records, args.out)
    mean = sum(sum(r["rewards"]) for r in records) / max(1, sum(len(r["rewards"]) for r in records))
    print(f"wrote {len(records)} groups x {args.n} completions of {args.model} on {gen.task.name} to {args.out} "
          f"(mean reward {mean:.3f}, {time.perf_counter() - t:.0f} s)", flush=True)
    return 0


# Presets of ``prep``: question column, answer column, answer transform, data_source.
PREP_PRESETS = {"gsm8k": ("question", "answer", "gsm8k", "openai/gsm8k"), "math": ("problem", "answer", None, "math"),
                "math500": ("problem", "answer", None, "HuggingFaceH4/MATH-500")}


def _prep(args) -> int:
    """A dataset (local files, a saved folder, or a hub name) -> ``OUT/train.parquet`` and
    ``OUT/test.parquet`` in verl's layout, which ``--generator.task dataset`` reads as it is."""
    from agro_dist.tasks.problems import _gsm8k_answer, _get_path, read_rows

    q_key, a_key, transform, source = PREP_PRESETS.get(args.preset, (args.prompt_key, args.answer_key, None, args.source))
    q_key, a_key = args.prompt_key or q_key, args.answer_key or a_key
    if not q_key or not a_key:
        raise SystemExit("prep: give --preset gsm8k|math|math500, or --prompt-key and --answer-key")
    os.makedirs(args.out, exist_ok=True)
    for split in ("train", "test"):
        rows = read_rows(args.source, split, hub_config=args.hub_config)
        if rows is None:
            print(f"{args.source}: no {split} split", flush=True)
            continue
        out = []
        for i, (where, row) in enumerate(rows):
            try:
                question, answer = _get_path(row, q_key), _get_path(row, a_key)
            except KeyError as e:
                raise SystemExit(f"{where}: field {e.args[0]!r} missing (columns: {sorted(row)})") from None
            if transform == "gsm8k":
                try:
                    answer = _gsm8k_answer(str(answer))
                except ValueError as e:
                    raise SystemExit(f"{where}: field {a_key!r}: {e}") from None
            content = f"{question}\n\n{args.instruction}" if args.instruction else str(question)
            out.append({"data_source": source, "prompt": [{"role": "user", "content": content}], "ability": "math",
                        "reward_model": {"style": "rule", "ground_truth": str(answer)}, "extra_info": {"split": split, "index": i}})
        write_records(out, os.path.join(args.out, f"{split}.parquet"))
        print(f"wrote {len(out)} rows to {os.path.join(args.out, split + '.parquet')}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agro_dist.data", description="Data: logged generations for offline training (sample), prompts for training (prep).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="sample a task's training prompts with vLLM and write them with rewards and behaviour log-probs")
    s.add_argument("--model", default="default", help="model folder, or 'default' (SmolLM2-135M-Instruct): pi_ref for the paper's offline setting")
    s.add_argument("--task", default="arithmetic", help="arithmetic, math, gsm8k or jsonl")
    s.add_argument("--task-path", help="data file or folder of the task")
    s.add_argument("--task-options", help="task arguments as JSON, e.g. '{\"levels\": [1, 2]}'")
    s.add_argument("--reward-fn", help="reward: numeric, math, or pkg.module:function (default: the task's)")
    s.add_argument("--n", type=int, default=4, help="completions per prompt")
    s.add_argument("--prompts", type=int, default=256, help="prompts (groups) to sample")
    s.add_argument("--batch", type=int, default=32, help="prompts per vLLM call")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--max-tokens", type=int, default=12)
    s.add_argument("--max-model-len", type=int, default=1024)
    s.add_argument("--kv-cache-gb", type=float, default=2.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output file: .jsonl, or .parquet")
    r = sub.add_parser("prep", help="turn a dataset (local JSONL/Parquet/CSV files, a saved folder, or a hub name where reachable) into "
                                    "OUT/train.parquet and OUT/test.parquet in verl's layout, for --generator.task dataset")
    r.add_argument("source", help="a data file, a folder of files by split (train.jsonl, test.jsonl, ...), a save_to_disk folder, or a hub name")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--preset", choices=sorted(PREP_PRESETS), help="the columns of GSM8K (its '#### N' answers), MATH or MATH-500")
    r.add_argument("--prompt-key", help="the question column (default: the preset's)")
    r.add_argument("--answer-key", help="the reference answer column (default: the preset's)")
    r.add_argument("--instruction", default="", help="text appended to every question (default: none)")
    r.add_argument("--hub-config", help="the hub dataset's configuration, e.g. main for openai/gsm8k")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    # Before torch and vLLM are imported (by the generator module, in sample): as in a run's generator.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    args = parser().parse_args(argv)
    if args.cmd == "sample":
        return _sample(args)
    if args.cmd == "prep":
        return _prep(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
