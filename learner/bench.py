"""Learner step time, throughput and memory on a real model: packed against padded, beside a plain PyTorch peer.

    python -m agro_dist.learner.bench [--model default] [--shapes 8x4x46x3-12,1x8x150x100-400] [--steps 3] [--repeats 2] [--lora 0,16]

A shape ``GxNxPxR`` is G groups of N completions, P prompt and R response tokens each; ``R`` may
be a range ``lo-hi`` (each completion's length drawn uniformly). The defaults are the default
run's shape (8 groups x 4 completions, 46-token prompts, 3-12 tokens; micro-batches of 4 groups
as the default run has) and a MATH-like one (150-token prompts, 8 completions of 100-400 tokens).
For each shape, each implementation in its own process (so peak RSS is its own), the learner's
layouts alternating ``--repeats`` times (``learner.pack``): ``prefix`` (each prompt once, the
completions over its keys and values), ``rows`` (each group once under a 4-D mask, packed into
rows of ``--pack-tokens``) and ``none`` (one padded row per completion, the prompt n times);
beside them a plain PyTorch loop (Hugging Face forward with full-vocabulary float32 logits, the
same loss, torch AdamW, one padded micro-batch per group). It prints seconds per step (median of
--steps after one warm-up step, over the repeats), trained tokens/s, the fraction of the FLOP
floor two ways (6 x params x tokens at this machine's measured float32 matmul rate: on the
tokens each layout computes, and on the distinct tokens, each prompt once), peak RSS, and the
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


def synthetic_groups(G: int, N: int, P: int, R, vocab: int, seed: int):
    """G groups of N random completions; ``R``: a length, or (lo, hi) drawn per completion."""
    from agro_dist.core.records import Completion, Group

    rng = np.random.default_rng(seed)
    lo, hi = (R, R) if isinstance(R, int) else R

    def comp():
        L = int(rng.integers(lo, hi + 1))
        return Completion(rng.integers(10, vocab, L), -rng.random(L).astype(np.float32), float(rng.integers(0, 2)), "length")

    return [Group(f"b{seed}-{i}", "", rng.integers(10, vocab, P).tolist(), [comp() for _ in range(N)], 0, "bench", group_id=f"b{seed}-{i}")
            for i in range(G)]


def plain_step(pol, ref, opt, groups, *, micro_groups: int, beta: float, device: str = "cpu", clip: float = 1.0) -> None:
    """One optimizer step of the plain PyTorch peer: Hugging Face forward with full-vocabulary
    float32 logits on padded rows, the ``agro_off`` loss (the mean over the batch's prompts),
    gradient-norm clipping, ``opt``."""
    from agro_dist.core.losses import get_loss
    from agro_dist.learner.batching import collate

    fn = get_loss("agro_off")
    opt.zero_grad()
    for s in range(0, len(groups), micro_groups):
        mb = collate(groups[s:s + micro_groups])
        ids, mask = mb.input_ids.to(device), mb.resp_mask.to(device)

        def lp(m):
            logits = m(input_ids=ids, attention_mask=mb.attention_mask.to(device)).logits[:, :-1].float()
            return torch.where(mask, torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2), 0.0)

        with torch.no_grad():
            r = lp(ref)
        loss, _ = fn(lp(pol), r, mask, mb.rewards.to(device), group_size=mb.group_size, beta=beta)
        (loss * mb.num_groups / len(groups)).backward()
    torch.nn.utils.clip_grad_norm_(pol.parameters(), clip)
    opt.step()


def parse_shape(shape: str):
    G, N, P, R = shape.lower().split("x")
    r = tuple(int(x) for x in R.split("-")) if "-" in R else int(R)
    return int(G), int(N), int(P), r


def _worker(spec: dict) -> dict:
    from agro_dist.io.models import resolve_model

    model = resolve_model(spec["model"])
    G, N, P, R = parse_shape(spec["shape"])
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    batches = [synthetic_groups(G, N, P, R, vocab, s) for s in range(spec["steps"] + 1)]
    times, split = [], {}
    if spec["impl"] == "plain":
        from transformers import AutoModelForCausalLM

        pol = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        opt = torch.optim.AdamW(pol.parameters(), lr=1e-6)
        for groups in batches:
            t = time.perf_counter()
            plain_step(pol, ref, opt, groups, micro_groups=1, beta=0.05)
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in pol.parameters())
    else:
        from agro_dist.learner.learner import Learner, LearnerConfig

        learner = Learner(LearnerConfig(model=model, batch_groups=G, micro_groups=spec["micro"], lr=1e-6, zero_stage=spec["zero"],
                                        pack=spec["pack"], pack_tokens=spec["pack_tokens"], dtype=spec.get("dtype", "float32"),
                                        micro_tokens=spec.get("micro_tokens", 0), lora_rank=spec.get("lora_rank", 0)))
        for i, groups in enumerate(batches):
            t = time.perf_counter()
            m = learner.train_step(groups)
            times.append(time.perf_counter() - t)
            if i:
                for k in ("ref_s", "policy_s", "optimizer_s"):
                    split.setdefault(k, []).append(m[k])
        if spec.get("profile"):  # one more step under torch's profiler: where the time goes
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=acts) as prof:
                learner.train_step(batches[0])
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            ops = prof.key_averages()
            split["profile"] = ops.table(sort_by=sort, row_limit=spec["profile"], max_name_column_width=48)
            split["profile_cpu"] = ops.table(sort_by="self_cpu_time_total", row_limit=spec["profile"], max_name_column_width=48)
        t = time.perf_counter()
        _, sent = learner.publish(adapters=True)  # what the generators get (LoRA: the adapters alone)
        split["publish_s"] = [time.perf_counter() - t]
        split["publish_mb"] = [sum(v.numel() * v.element_size() for v in {id(v): v for v in sent.values()}.values()) / 2**20]
        params = sum(p.numel() for n, p in learner.module.named_parameters() if ".lora_" not in n)  # LoRA: the base's
    measured = batches[1:]
    resp = sum(len(c.token_ids) for b in measured for g in b for c in g.completions) / len(measured)
    padded = sum(len(g.prompt_token_ids) * g.n for b in measured for g in b) / len(measured) + resp
    distinct = sum(len(g.prompt_token_ids) for b in measured for g in b) / len(measured) + resp
    computed = padded if spec.get("pack", "none") == "none" else distinct
    return dict(times=times[1:], tokens=computed, distinct_tokens=distinct, response_tokens=resp, params=params,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, split=split,
                peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.learner.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--shapes", default="8x4x46x3-12,1x8x150x100-400", help="comma-separated GxNxPxR, R a length or lo-hi (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="times the learner's layouts alternate (default: %(default)s)")
    ap.add_argument("--packs", default="none,prefix,rows", help="the learner's layouts, the first is the baseline (default: %(default)s)")
    ap.add_argument("--micro-groups", type=int, default=4, help="groups per micro-batch where G allows (default: %(default)s, the default run's)")
    ap.add_argument("--pack-tokens", type=int, default=1024, help="the rows layout's row budget (default: %(default)s)")
    ap.add_argument("--micro-tokens", type=int, default=0, help="the learner's micro-batches by tokens (learner.micro_tokens; "
                    "0: --micro-groups; default: %(default)s)")
    ap.add_argument("--zero", type=int, default=0, help="the learner's ZeRO stage (default: %(default)s)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch peer")
    ap.add_argument("--lora", default="0", help="learner.lora_rank values, each with every layout; 0 = full fine-tuning (default: %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(json.loads(a.worker))), flush=True)
        return 0
    from agro_dist.io.models import resolve_model

    resolve_model(a.model)  # convert the default model once, before the timed processes
    rate = matmul_flops()
    print(f"float32 matmul: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); model {a.model}; learner ZeRO {a.zero}, "
          + (f"micro-batches of up to {a.micro_tokens} tokens\n" if a.micro_tokens else f"micro-batches of {a.micro_groups} groups where G allows\n"))
    hdr = (f"{'shape GxNxPxR':17} {'implementation':26} {'s/step':>7} {'tokens/s':>8} {'floor(comp)':>11} {'floor(dist)':>11} "
           f"{'peak RSS MB':>11} {'vs ' + a.packs.split(',')[0]:>9}   split: ref / policy / optimizer / publish (s) (MB published)")
    print(hdr)
    print("-" * len(hdr))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for shape in a.shapes.split(","):
        G = parse_shape(shape)[0]
        micro = a.micro_groups if G % a.micro_groups == 0 else 1
        packs = a.packs.split(",")
        ranks = [int(r) for r in a.lora.split(",")]
        names = {(p, r): f"agro_dist {p}" + (f" ({a.pack_tokens})" if p == "rows" else "") + (f" LoRA {r}" if r else "")
                 for p in packs for r in ranks}
        runs = ([("plain", "none", 0, "plain PyTorch (peer)")] if not a.no_plain else []) + \
            [("learner", p, r, names[p, r]) for r in ranks for p in packs] * a.repeats
        rows = {}
        for impl, pack, rank, label in runs:
            spec = dict(model=a.model, shape=shape, steps=a.steps, impl=impl, zero=a.zero, micro=micro, pack=pack, pack_tokens=a.pack_tokens,
                        micro_tokens=a.micro_tokens, lora_rank=rank)
            out = subprocess.run([sys.executable, "-m", "agro_dist.learner.bench", "--worker", json.dumps(spec)], capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"{shape:17} {label:26} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            r = json.loads(lines[-1][7:])
            if label in rows:  # a repeat: pool the step times, keep the larger peak
                old = rows[label]
                old["times"] += r["times"]
                old["peak_rss_mb"] = max(old["peak_rss_mb"], r["peak_rss_mb"])
                for k, v in r["split"].items():
                    old["split"].setdefault(k, []).extend(v)
            else:
                rows[label] = r
        first = names[packs[0], ranks[0]]
        base = statistics.median(rows[first]["times"]) if first in rows else float("nan")
        for label, r in rows.items():
            step = statistics.median(r["times"])
            comp, dist = (6 * r["params"] * r[k] / rate / step for k in ("tokens", "distinct_tokens"))
            sp = {k: statistics.median(v) for k, v in r["split"].items()}
            split = " / ".join(f"{sp[k]:.2f}" for k in ("ref_s", "policy_s", "optimizer_s", "publish_s")) + f" ({sp['publish_mb']:.0f} MB)" if sp else "-"
            print(f"{shape:17} {label:26} {step:7.2f} {r['tokens'] / step:8.0f} {comp:10.1%} {dist:10.1%} {r['peak_rss_mb']:11.0f} "
                  f"{base / step:8.2f}x   {split}")
    print("\ntokens = tokens through the policy (prompt + response; prefix and rows: each prompt once); floor(comp) = 6 x params x those "
          "tokens / matmul rate / step time; floor(dist) = the same on the distinct tokens (each prompt once): the work that "
          "must be done. The reference forward (~1/3 more) is extra work neither floor counts. vs = the first layout's "
          "learner's time / this time (higher is faster). LoRA rows publish the adapters alone (what the generators are sent).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
