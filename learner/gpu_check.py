"""The learner on a GPU, in one short run (issue 12 part 3): correctness, then throughput.

    python -m agro_dist.learner.gpu_check [--shapes 0.5b,1.5b] [--batch 8x8x150x100-400] [--steps 3]

For a machine with CUDA PyTorch and transformers but no Ray or vLLM (the `device` tool's): the
learner needs DeepSpeed and what it imports that such an image may lack (hjson, pydantic and its
pydantic-core, annotated-types, typing-inspection), carried as wheels for the device's Python
(~5 MB; the DeepSpeed wheel is the one `pip install deepspeed==0.19.8` builds here, ops left to
build at run time, and the torch-AdamW learner needs none):
`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
-d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection hjson peft==0.21.2 accelerate`
(peft for the LoRA rows), then there
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
`PYTHONPATH=/tmp/site:. python -m agro_dist.learner.gpu_check`. Run on an H200 on 2026-11-28
(docs/learner.md, "On a GPU"). It prints:
1. the measured bf16 and float32 matmul rates;
2. correctness on a tiny random-init Qwen2 in float32, on CUDA with NCCL and one rank: ZeRO 0, 2
   and 3 with each layout (`learner.pack` none, prefix, rows) against a plain PyTorch loop
   (Hugging Face forward with full-vocabulary logits, the same loss, torch AdamW): the largest
   weight difference after two steps (<1e-5 expected: float32 on GPU, TF32 off); then LoRA
   (`learner.lora_rank` 4, ZeRO 0 and 2) against the same loop over a peft model, and the
   adapters a generator is sent merged over the base file against the learner's own merge;
3. throughput on random-init Qwen2 shapes (0.5B, 1.5B) in bf16, ZeRO 0, each layout (`--packs`)
   with micro-batches of one group and by tokens (`--micro-tokens`), full fine-tuning and LoRA
   (`--lora`, rank 16 by default; one group per micro-batch): seconds per step, tokens/s
   and model FLOPs utilisation (6 x params x distinct tokens per second over the measured bf16
   matmul rate), peak GPU memory; `--profile N` adds the step split and torch profiler's top N
   ops. Each run in its own process.
It runs on CPU too (`--device cpu`, smaller shapes), which is how it was checked here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPES = {  # Qwen2-0.5B and Qwen2-1.5B's dimensions, random weights
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=512),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
}


def make_model(name: str, root: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """A random-init Qwen2 of shape ``name`` saved in ``dtype``, initialised on ``device`` (a 1.5B
    model's init takes a minute on CPU and a second on a GPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        cfg = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=True, **SHAPES[name])
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).to(dtype)
        model.save_pretrained(path)
        del model
    return path


def matmul_rate(dtype: torch.dtype, device: str, n: int = 4096, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def correctness(model: str) -> None:
    from transformers import AutoModelForCausalLM

    from agro_dist.learner.bench import plain_step, synthetic_groups
    from agro_dist.learner.learner import Learner, LearnerConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [synthetic_groups(4, 4, 12, (1, 16), 512, s) for s in range(2)]
    common = dict(batch_groups=4, lr=1e-2, beta=0.1, weight_decay=0.01, grad_clip=1.0, adam_eps=1e-4)
    # the plain loop
    torch.manual_seed(0)
    pol = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev).eval()
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-4)
    for groups in batches:
        plain_step(pol, ref, opt, groups, micro_groups=4, beta=0.1, device=dev)
    want = {k: v.detach().cpu() for k, v in pol.named_parameters()}
    del pol, ref, opt
    print(f"{'ZeRO':>4} {'pack':>7}  max |weight - plain loop| after 2 steps (float32 on {dev})")
    for zero in (0, 2, 3):
        for pack in ("none", "prefix", "rows"):
            try:  # one configuration failing must not hide the others' results
                learner = Learner(LearnerConfig(model=model, micro_groups=4, zero_stage=zero, pack=pack, pack_tokens=64, **common))
                for b in batches:
                    learner.train_step(b)
                got = learner.publish()[1]
            except Exception as e:  # noqa: BLE001
                print(f"{zero:>4} {pack:>7}  failed: {type(e).__name__}: {e}", flush=True)
                continue
            diff = max((got[k].float() - want[k]).abs().max().item() for k in want if k in got)
            print(f"{zero:>4} {pack:>7}  {diff:.2e} {'ok' if diff < 1e-5 else 'DIFFERS'}", flush=True)
            del learner
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def lora_correctness(model: str, rank: int = 4) -> None:
    """LoRA (learner.lora_rank) against a plain peft loop: the same adapters to start with, two
    steps, then the merged weights compared (and the adapters sent to generators merged over the
    base file, as a generator does, against the learner's own merge)."""
    try:
        from peft import set_peft_model_state_dict
    except ImportError:
        print("LoRA: peft is not installed here (carry its wheel and accelerate's, see above): skipped\n", flush=True)
        return
    from transformers import AutoModelForCausalLM

    from agro_dist.io.weights import iter_safetensors
    from agro_dist.io.weights import merge_adapters
    from agro_dist.learner import lora
    from agro_dist.learner.bench import plain_step, synthetic_groups
    from agro_dist.learner.learner import Learner, LearnerConfig

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    batches = [synthetic_groups(4, 4, 12, (1, 16), vocab, s) for s in range(2)]
    print(f"{'ZeRO':>4} {'pack':>7}  LoRA rank {rank}: max |merged weight - plain peft loop| after 2 steps; adapters merged as a generator does")
    for zero in (0, 2):
        for pack in ("prefix", "rows"):
            try:
                learner = Learner(LearnerConfig(model=model, batch_groups=4, micro_groups=4, zero_stage=zero, pack=pack, pack_tokens=64, lr=1e-2,
                                                beta=0.1, weight_decay=0.01, grad_clip=1.0, adam_eps=1e-4, lora_rank=rank))
                pol = lora.wrap(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), rank=rank, alpha=0, dropout=0.0, targets=None)
                set_peft_model_state_dict(pol, lora.adapter_state_dict(learner.module))  # the learner's starting adapters
                pol.to(dev)
                ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(dev).eval()
                opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01, eps=1e-4)
                for b in batches:
                    learner.train_step(b)
                    plain_step(pol, ref, opt, b, micro_groups=4, beta=0.1, device=dev)
                got = learner.publish()[1]
                want = {k: v.detach().cpu() for k, v in lora.merged_state_dict(pol).items()}
                sent = dict(merge_adapters(iter_safetensors(model), learner.publish(adapters=True)[1]))
            except Exception as e:  # noqa: BLE001
                print(f"{zero:>4} {pack:>7}  failed: {type(e).__name__}: {e}", flush=True)
                continue
            diff = max((got[k].float() - want[k].float()).abs().max().item() for k in want if k in got)
            gen = max((got[k].float() - sent[k].float()).abs().max().item() for k in sent if k in got)
            ok = diff < 1e-5 and gen < 1e-6
            print(f"{zero:>4} {pack:>7}  {diff:.2e} (generator's merge {gen:.1e}) {'ok' if ok else 'DIFFERS'}", flush=True)
            del learner, pol, ref, opt
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.learner.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0.5b,1.5b", help="model shapes for throughput: tiny, 0.5b, 1.5b (default: %(default)s)")
    ap.add_argument("--batch", default="8x8x150x100-400", help="GxNxPxR per step (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--packs", default="none,prefix", help="the learner's layouts in the throughput table (default: %(default)s)")
    ap.add_argument("--micro-tokens", default="0,16384",
                    help="learner.micro_tokens values in the throughput table, 0 = micro-batches of one group (default: %(default)s)")
    ap.add_argument("--lora", default="0,16", help="learner.lora_rank values in the throughput table, 0 = full fine-tuning (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--profile", type=int, default=0, help="print the learner's step split and torch profiler's top N ops per run")
    a = ap.parse_args(argv)
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    root = tempfile.mkdtemp(prefix="agro_dist-gpu-check-")
    try:
        return _run(a, dtype, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the random models: gigabytes nobody asked to keep


def _run(a, dtype: str, root: str) -> int:
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    rates = {d: matmul_rate(getattr(torch, d), a.device, n=8192 if a.device == "cuda" else 1024, reps=20 if a.device == "cuda" else 3)
             for d in ("bfloat16", "float32")}
    print(f"torch {torch.__version__} on {name}: bf16 matmul {rates['bfloat16'] / 1e12:.1f} TFLOP/s, "
          f"float32 {rates['float32'] / 1e12:.1f} TFLOP/s\n", flush=True)
    if not a.skip_correctness:
        correctness(make_model("tiny", root))
        lora_correctness(make_model("tiny", root))
        print(f"({time.perf_counter() - t0:.0f} s so far)\n", flush=True)
    print(f"{'shape':6} {'pack':10} {'micro':>6} {'s/step':>7} {'tokens/s':>9} {'MFU':>6} {'peak GPU GB':>11}  ({a.batch}, {dtype}, ZeRO 0; "
          "micro: learner.micro_tokens, 0 = one group per micro-batch)")
    for shape in a.shapes.split(","):
        model = make_model(shape, root, a.device, getattr(torch, dtype))
        for pack, mt, rank in [(p, int(m), int(r)) for r in a.lora.split(",") for p in a.packs.split(",") for m in a.micro_tokens.split(",")]:
            if rank and mt:
                continue  # LoRA rows: micro-batches of one group only (the table stays short)
            spec = dict(model=model, shape=a.batch, steps=a.steps, impl="learner", zero=0, micro=1, pack=pack, pack_tokens=4096, dtype=dtype,
                        profile=a.profile, micro_tokens=mt, lora_rank=rank)
            out = subprocess.run([sys.executable, "-m", "agro_dist.learner.bench", "--worker", json.dumps(spec)], capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                tail = " | ".join(out.stderr.strip().splitlines()[-3:]) or f"exit {out.returncode}"
                print(f"{shape:6} {pack + (f' L{rank}' if rank else ''):10} {mt:6} failed: {tail}", flush=True)
                continue
            r = json.loads(lines[-1][7:])
            step = statistics.median(r["times"])
            mfu = 6 * r["params"] * r["distinct_tokens"] / step / rates[dtype]
            print(f"{shape:6} {pack + (f' L{rank}' if rank else ''):10} {mt:6} {step:7.2f} {r['tokens'] / step:9.0f} {mfu:6.1%} "
                  f"{r['peak_gpu_mb'] / 1024:11.1f}", flush=True)
            if a.profile:
                sp = {k: statistics.median(v) for k, v in r["split"].items() if k.endswith("_s")}
                print("  split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sp.items()))
                print(r["split"]["profile"] + "\n" + r["split"]["profile_cpu"], flush=True)
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    print("\nMFU = 6 x params x distinct tokens (each prompt once) per second / the measured matmul rate of the dtype "
          "(pack ... L16: LoRA rank 16, whose backward computes no weight gradients for the base: its floor is ~4 x, not 6 x).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
