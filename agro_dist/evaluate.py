"""``python -m agro_dist.evaluate``: held-out greedy and sampled accuracy of any model folder.

    python -m agro_dist.evaluate --model runs/agro/checkpoints/step_00000040/hf --task arithmetic
    python -m agro_dist.evaluate --model default --task gsm8k --task-path ../shared/data/gsm8k
    python -m agro_dist.evaluate --model runs/agro/checkpoints/step_00000040/hf --config runs/agro/config.yaml

It is the run's own evaluation (``Generator.evaluate``: the same prompts, chat template, reward,
held-out split, temperature and engine seed), in one process with one vLLM engine and no Ray, so
a trained model and its base can be compared with the numbers the run reported. With a run's
``config.yaml`` it evaluates exactly as that run did; any other key can be given as in the driver
(``--generator.max_tokens 64``, ``--run.eval_size 100``). Prints a table and one JSON line
(``AGRO_EVAL {...}``); ``--out FILE`` also writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import List, Optional

import yaml

from agro_dist.io.storage import fetch
from agro_dist.run import config as config_mod
from agro_dist.run.config import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agro_dist.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model folder (a checkpoint's hf/, also on run.storage_path's "
                                                  "bucket: s3://.../hf), or 'default'")
    p.add_argument("--config", help="a run's config.yaml: evaluate the way that run did (task, reward, temperature, seed)")
    p.add_argument("--task", help="arithmetic, math, math500, gsm8k or jsonl (default: the config's generator.task)")
    p.add_argument("--task-path", help="data file or folder for math/math500/gsm8k/jsonl")
    p.add_argument("--task-options", help="task arguments as YAML, e.g. '{levels: [1, 2]}'")
    p.add_argument("--size", type=int, help="held-out problems (default: run.eval_size; 0 = the whole held-out set)")
    p.add_argument("--samples", type=int, help="samples per problem for the sampled accuracy (default: run.eval_samples)")
    p.add_argument("--out", help="also write the result as JSON to this file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # Its INFO lines would come through our handler. Not left to the generator module: agro_dist.run.config
    # imported it (setting the vllm logger from VLLM_LOGGING_LEVEL) before the line above.
    logging.getLogger("vllm").setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # read when torch loads (later): no C++ "NUMA binding" notice
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = parser().parse_known_args(argv)
    shown, given = own.model, [own.model, own.config]
    try:  # a checkpoint or config on run.storage_path's bucket: a local copy first, removed at the end
        own.model, own.config = fetch(own.model), own.config and fetch(own.config)
    except OSError as e:
        print(f"agro_dist.evaluate: error: {e}", file=sys.stderr)
        return 3
    try:
        return _evaluate(own, rest, shown)
    finally:
        for uri, local in zip(given, [own.model, own.config]):
            if uri and local and local != uri:  # fetch's temporary copy (a model is as large as its weights)
                shutil.rmtree(local if os.path.isdir(local) else os.path.dirname(local), ignore_errors=True)


def _evaluate(own: argparse.Namespace, rest: List[str], shown: str) -> int:
    try:
        cfg, _ = config_mod.from_args((["--config", own.config] if own.config else []) + rest)
        overrides = {}
        if own.task:
            overrides["generator.task"] = own.task
            if own.task != cfg.generator.task:
                overrides["generator.task_options"] = {}  # the config's task options belong to its own task
        if own.task_path:
            overrides["generator.task_path"] = own.task_path
        if own.task_options:
            overrides["generator.task_options"] = yaml.safe_load(own.task_options) or {}
        for k, v in overrides.items():
            config_mod._set(cfg, k, v, "command line")
    except ConfigError as e:
        print(f"agro_dist.evaluate: error: {e}", file=sys.stderr)
        return 2
    from agro_dist.actors.generator import Generator

    gc = cfg.eval_generator_config() if not own.task else cfg.generator_config(0)  # the eval actor's: seed = run.seed
    gc.update(model=own.model, generator_id="eval")
    size = cfg.run.eval_size if own.size is None else own.size
    samples = cfg.run.eval_samples if own.samples is None else own.samples
    t = time.perf_counter()
    try:
        gen = Generator(gc)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"agro_dist.evaluate: error: {e}", file=sys.stderr)
        return 3
    try:
        res = gen.evaluate(size or None, samples=samples)
    finally:
        gen.close()
    res.update(model=shown, task=gc["task"], task_path=gc["task_path"], temperature=gc["temperature"], samples=samples,
               seconds=round(time.perf_counter() - t, 1))
    print(f"\nheld-out accuracy of {shown} on {gc['task']} ({int(res['eval_problems'])} problems)\n"
          f"  greedy               {100 * res['greedy_accuracy']:5.1f}%\n"
          f"  sampled (T={gc['temperature']:g}, {samples} each) {100 * res['sampled_accuracy']:5.1f}%", flush=True)
    print("AGRO_EVAL " + json.dumps(res), flush=True)
    if own.out:
        with open(own.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
