"""Learner step time, throughput and memory on a real model, beside a plain PyTorch peer.

    python -m agro_dist.learner.bench [--model default] [--shapes 1x4x32x64,2x4x64x128] [--steps 3]

A shape ``GxNxPxR`` is G groups of N completions, P prompt and R response tokens each (one rank,
one micro-batch per group). For each shape, in separate processes (so peak RSS is each run's
own): the learner under DeepSpeed ZeRO 0 and ZeRO 2, and a plain PyTorch loop (Hugging Face
forward with full-vocabulary float32 logits, the same loss, torch AdamW). It prints seconds per
step (median of --steps after one warm-up step), trained tokens/s, the fraction of the FLOP floor
(6 x params x trained tokens at this machine's measured float32 matmul rate), peak RSS, and the
learner's time split (reference forward / policy forward+backward / optimizer / publish).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch


def matmul_flops(seconds: float = 2.0, n: int = 1024) -> float:
    """float32 matmul FLOP/s with this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def synthetic_groups(G: int, N: int, P: int, R: int, vocab: int, seed: int):
    from agro_dist.records import Completion, Group

    rng = np.random.default_rng(seed)
    return [
        Group(f"b{seed}-{i}", "", rng.integers(10, vocab, P).tolist(),
              [Completion(rng.integers(10, vocab, R), -rng.random(R).astype(np.float32), float(rng.integers(0, 2)), "length") for _ in range(N)],
              0, "bench", group_id=f"b{seed}-{i}")
        for i in range(G)
    ]


def _worker(spec: dict) -> dict:
    from agro_dist.models import resolve_model

    model = resolve_model(spec["model"])
    G, N, P, R = spec["shape"]
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    batches = [synthetic_groups(G, N, P, R, vocab, s) for s in range(spec["steps"] + 1)]
    times, split = [], {}
    if spec["impl"] == "plain":
        from transformers import AutoModelForCausalLM

        from agro_dist.learner.batching import collate
        from agro_dist.losses import get_loss

        pol = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        opt = torch.optim.AdamW(pol.parameters(), lr=1e-6)
        fn = get_loss("agro_off")
        for groups in batches:
            t = time.perf_counter()
            opt.zero_grad()
            for g in groups:
                mb = collate([g])

                def lp(m):
                    logits = m(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
                    return torch.where(mb.resp_mask, torch.log_softmax(logits, -1).gather(2, mb.input_ids[:, 1:, None]).squeeze(2), 0.0)

                with torch.no_grad():
                    r = lp(ref)
                loss, _ = fn(lp(pol), r, mb.resp_mask, mb.rewards, group_size=N, beta=0.05)
                (loss / len(groups)).backward()
            torch.nn.utils.clip_grad_norm_(pol.parameters(), 1.0)
            opt.step()
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in pol.parameters())
    else:
        from agro_dist.learner.learner import Learner, LearnerConfig

        learner = Learner(LearnerConfig(model=model, batch_groups=G, micro_groups=1, lr=1e-6, zero_stage=spec["zero"]))
        for i, groups in enumerate(batches):
            t = time.perf_counter()
            m = learner.train_step(groups)
            times.append(time.perf_counter() - t)
            if i:
                for k in ("ref_s", "policy_s", "optimizer_s"):
                    split.setdefault(k, []).append(m[k])
        t = time.perf_counter()
        learner.publish()
        split["publish_s"] = [time.perf_counter() - t]
        params = sum(p.numel() for p in learner.module.parameters())
    tokens = G * N * (P + R)
    return dict(step_s=statistics.median(times[1:]), tokens=tokens, response_tokens=G * N * R, params=params,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                split={k: statistics.median(v) for k, v in split.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.learner.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--shapes", default="1x4x32x64,2x4x64x128", help="comma-separated GxNxPxR (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up (default: %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(json.loads(a.worker))), flush=True)
        return 0
    from agro_dist.models import resolve_model

    resolve_model(a.model)  # convert the default model once, before the timed processes
    rate = matmul_flops()
    print(f"float32 matmul: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); model {a.model}\n")
    hdr = f"{'shape GxNxPxR':15} {'implementation':24} {'s/step':>7} {'tokens/s':>8} {'FLOP floor':>10} {'peak RSS MB':>11} {'vs plain':>8}   split: ref / policy / optimizer / publish (s)"
    print(hdr)
    print("-" * len(hdr))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for shape in a.shapes.split(","):
        G, N, P, R = (int(x) for x in shape.lower().split("x"))
        rows = {}
        for impl, zero, label in (("plain", 0, "plain PyTorch (peer)"), ("learner", 0, "agro_dist ZeRO 0"), ("learner", 2, "agro_dist ZeRO 2")):
            spec = dict(model=a.model, shape=[G, N, P, R], steps=a.steps, impl=impl, zero=zero)
            out = subprocess.run([sys.executable, "-m", "agro_dist.learner.bench", "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"{shape:15} {label:24} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            r = json.loads(lines[-1][7:])
            rows[label] = r
            floor = 6 * r["params"] * r["tokens"] / rate
            ratio = r["step_s"] / rows["plain PyTorch (peer)"]["step_s"] if "plain PyTorch (peer)" in rows else float("nan")
            sp = r["split"]
            split = " / ".join(f"{sp[k]:.2f}" for k in ("ref_s", "policy_s", "optimizer_s", "publish_s")) if sp else "-"
            print(f"{shape:15} {label:24} {r['step_s']:7.2f} {r['tokens'] / r['step_s']:8.0f} {floor / r['step_s']:9.1%} {r['peak_rss_mb']:11.0f} {ratio:7.2f}x   {split}")
    print("\ntokens = all tokens through the policy (prompt + response); FLOP floor = 6 x params x tokens / matmul rate "
          "(the reference forward, ~1/3 more, is extra work the floor does not count); vs plain = time / plain PyTorch time.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
