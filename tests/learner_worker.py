"""A learner process for the multi-rank and crash tests (run directly or under torchrun).

    python tests/learner_worker.py MODEL OUT --steps 4 [--zero 2] [--checkpoint-at 2]
        [--kill-after 3] [--resume] [--ckpt URI] [--kill-in-upload 4] [--micro-groups 1] [--micro-tokens 0] [--batch-groups 4] [--lora-rank 0]

Batches are a pure function of the step number (seeded), so any process at any step sees the
same data. After every step rank 0 writes the parameters to OUT/params_{step}.safetensors.
"""

import argparse
import os
import signal
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from agro_dist.core.records import Completion, Group
from agro_dist.learner.learner import Learner, LearnerConfig


def batch_for_step(step: int, num_groups: int, n: int = 4, vocab: int = 64, seed: int = 0):
    rng = np.random.default_rng([seed, step])
    groups = []
    for i in range(num_groups):
        comps = []
        for _ in range(n):
            T = int(rng.integers(1, 12))
            comps.append(Completion(rng.integers(1, vocab, T), -rng.random(T).astype(np.float32), float(rng.integers(0, 2)), "stop"))
        groups.append(Group(f"s{step}-p{i}", "x", rng.integers(1, vocab, int(rng.integers(2, 8))).tolist(), comps, step, "gen", group_id=f"s{step}-g{i}"))
    return groups


def make_learner(model, **kw):
    """A learner on the tiny test model with the tests' usual settings."""
    base = dict(model=model, batch_groups=4, micro_groups=2, lr=1e-2, beta=0.1, weight_decay=0.01, grad_clip=1.0)
    base.update(kw)
    return Learner(LearnerConfig(**base))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--batch-groups", type=int, default=4)
    ap.add_argument("--micro-groups", type=int, default=1)
    ap.add_argument("--micro-tokens", type=int, default=0)
    ap.add_argument("--loss", default="agro_off")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--checkpoint-at", type=int, nargs="+", default=[])
    ap.add_argument("--ckpt", default=None, help="checkpoint root (a folder or a storage URI); default OUT/ckpt")
    ap.add_argument("--kill-in-upload", type=int, default=0, help="SIGKILL this process after 3 files of the checkpoint after this step are uploaded")
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)  # the same reduction order in every process
    cfg = LearnerConfig(model=a.model, zero_stage=a.zero, batch_groups=a.batch_groups, micro_groups=a.micro_groups, micro_tokens=a.micro_tokens,
                        lr=1e-2, beta=0.1, loss=a.loss, lora_rank=a.lora_rank, weight_decay=0.01, warmup_steps=2, lr_schedule="cosine", total_steps=8,
                        adam_eps=1e-4)  # bounds Adam's amplification of float noise (see test_learner.py)
    learner = Learner(cfg)
    ckpt = a.ckpt or os.path.join(a.out, "ckpt")
    start = 0
    if a.resume:
        start = learner.load_checkpoint(ckpt)["extra"]["next_step"]
    per = a.batch_groups // learner.world
    for step in range(start, a.steps):
        groups = batch_for_step(step, a.batch_groups)
        m = learner.train_step(groups[learner.rank * per:(learner.rank + 1) * per])
        if learner.rank == 0:
            _, sd = learner.publish()
            save_file({k: v.clone() for k, v in sd.items()}, os.path.join(a.out, f"params_{step}.safetensors"))  # tied names share a tensor
            print(f"step {step} version {int(m['version'])} loss_pg {m['loss_pg']:.6f}", flush=True)
        if a.kill_in_upload and step + 1 == a.kill_in_upload:
            # A fault injected by the test: the process dies half-way through uploading a checkpoint.
            import pyarrow.fs as pafs

            real, sent = pafs.copy_files, [0]

            def copy_then_die(*args, **kw):
                real(*args, **kw)
                sent[0] += 1
                if sent[0] == 3:
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

            pafs.copy_files = copy_then_die
        if step + 1 in a.checkpoint_at:
            learner.save_checkpoint(ckpt, extra={"next_step": step + 1})
        if a.kill_after and step + 1 == a.kill_after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
    # Shut the process group's gloo threads down before the interpreter exits: left to exit-time
    # destructors, rank 0 once aborted with "terminate called without an active exception" after
    # finishing its steps (one CI run of stop 29, test_two_ranks_under_torchrun_match_one_rank).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
