"""Generator throughput beside transformers ``generate``, and the weight-update time.

    python -m agro_dist.actors.bench [--model default] [--prompts 8] [--n 4] [--max-tokens 64] [--calls 3]

Each implementation runs in its own process on the same arithmetic prompts (chat template
applied), sampling ``n`` completions per prompt at temperature 0.7 with ``max-tokens`` new tokens:
the agro_dist generator (vLLM, scoring included) and transformers' ``generate`` on the same model
(``num_return_sequences = n``, no scoring). It prints generated tokens/s, groups/s and the ratio,
then the time of ``update_weights`` from a state dict and from a safetensors folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _vllm(spec):
    import torch
    from transformers import AutoModelForCausalLM

    from agro_dist.actors.generator import Generator, GeneratorConfig

    g = Generator(GeneratorConfig(model=spec["model"], n=spec["n"], temperature=0.7, max_tokens=spec["max_tokens"],
                                  prompts_per_call=spec["prompts"], kv_cache_gb=2))
    g.generate()  # warm-up
    times, tokens, groups = [], 0, 0
    for _ in range(spec["calls"]):
        t = time.perf_counter()
        gs = g.generate()
        times.append(time.perf_counter() - t)
        tokens += sum(len(c.token_ids) for grp in gs for c in grp.completions)
        groups += len(gs)
    sd = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(g.model_path, dtype=torch.float32).state_dict().items()}
    upd = [g.update_weights(i + 1, sd) for i in range(3)]
    upd_path = [g.update_weights(10 + i, g.model_path) for i in range(2)]
    g.close()
    return dict(seconds=sum(times), tokens=tokens, groups=groups, update_dict_s=statistics.median(upd),
                update_folder_s=statistics.median(upd_path), load_s=g.load_s, reward_s=g.stats["reward_s"])


def _hf(spec):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agro_dist.io.models import resolve_model
    from agro_dist.tasks.problems import ArithmeticTask

    path = resolve_model(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = ArithmeticTask()
    stream = task.train(seed=0)
    times, tokens, groups = [], 0, 0
    for call in range(spec["calls"] + 1):
        probs = [next(stream) for _ in range(spec["prompts"])]
        enc = tok([task.prompt(tok, p) for p in probs], return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=0.7, max_new_tokens=spec["max_tokens"],
                                 num_return_sequences=spec["n"], pad_token_id=tok.pad_token_id or tok.eos_token_id)
        dt = time.perf_counter() - t
        new = out[:, enc["input_ids"].shape[1]:]
        stop = tok.eos_token_id
        n_tok = sum(int((row != stop).cumprod(0).sum()) + int((row == stop).any()) for row in new)
        if call:  # the first call warms up
            times.append(dt)
            tokens += n_tok
            groups += len(probs)
    return dict(seconds=sum(times), tokens=tokens, groups=groups)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.actors.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        print("RESULT " + json.dumps((_vllm if spec["impl"] == "vllm" else _hf)(spec)), flush=True)
        return 0
    from agro_dist.io.models import resolve_model

    resolve_model(a.model)
    spec = dict(model=a.model, prompts=a.prompts, n=a.n, max_tokens=a.max_tokens, calls=a.calls)
    res = {}
    for impl in ("vllm", "hf"):
        out = subprocess.run([sys.executable, "-m", "agro_dist.actors.bench", "--worker", json.dumps(dict(spec, impl=impl))],
                             capture_output=True, text=True, env=dict(os.environ))
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            print(f"{impl} failed:\n{out.stderr[-2000:]}")
            return 1
        res[impl] = json.loads(lines[-1][7:])
    print(f"model {a.model}; {a.prompts} prompts x {a.n} samples, <= {a.max_tokens} new tokens, temperature 0.7, "
          f"{a.calls} measured calls after a warm-up\n")
    print(f"{'implementation':34} {'tokens/s':>9} {'groups/s':>9} {'s/call':>7} {'ratio':>6}")
    base = res["hf"]["tokens"] / res["hf"]["seconds"]
    for impl, label in (("hf", "transformers generate (peer)"), ("vllm", "agro_dist generator (vLLM)")):
        r = res[impl]
        tps = r["tokens"] / r["seconds"]
        print(f"{label:34} {tps:9.1f} {r['groups'] / r['seconds']:9.2f} {r['seconds'] / a.calls:7.2f} {tps / base:5.2f}x")
    v = res["vllm"]
    print(f"\nvLLM engine load {v['load_s']:.1f} s; reward scoring {v['reward_s']:.2f} s in total (in the generator's time)")
    print(f"update_weights: from a state dict {v['update_dict_s']:.2f} s, from a safetensors folder {v['update_folder_s']:.2f} s (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
