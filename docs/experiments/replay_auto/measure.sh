#!/bin/bash
# As it ran on this machine (paths of the development setup: /work/fresh is a clone of main at c98db19).
# Issue 35 item 6: run.replay_prob auto against plain async p 0 with a slow generator, alone on the
# machine. The generator is made slower with a real vLLM setting (max_num_seqs 2: a call's 32
# sequences decode in 16 waves), as generation dominates on GPUs (max_num_seqs 8 was tried first:
# generation 32 s a call against a 36 s learner step, sharing the 2 cores, so the learner never
# waited: auto/probe_mns8_p0_train.csv). Same 15-minute budget, seed 0, the
# experiments task; in-run evaluations kept small (20 problems, 1 sample) because they run on the
# slowed engine; checkpoints every 5 steps are evaluated afterwards on the full held-out set with
# an unthrottled engine (python -m agro_dist.evaluate), so accuracy against minutes and generated
# completions comes from the same 200 problems x 4 samples as the other families.
cd /work/fresh
R=/work/exp_logs/auto; mkdir -p $R
COMMON=(--config docs/experiments/task.yaml --run.storage_path /work/exp_runs --run.seed 0 --run.mode async --run.steps 0
  --run.max_minutes 15 --run.eval_size 20 --run.eval_samples 1 --run.checkpoint_every 5 --generator.vllm "{max_num_seqs: 2}")
for p in 0 auto; do
  [ -f /work/exp_runs/auto-slowgen-p$p-s0/summary.json ] && continue
  echo "=== $(date) p=$p"
  .venv/bin/python -m agro_dist "${COMMON[@]}" --run.replay_prob $p --run.name auto-slowgen-p$p-s0 > $R/p$p.log 2>&1
done
for p in 0 auto; do
  for ck in /work/exp_runs/auto-slowgen-p$p-s0/checkpoints/step_*; do
    out=$R/eval-p$p-$(basename $ck).json
    [ -f $out ] && continue
    echo "=== $(date) eval $ck"
    .venv/bin/python -m agro_dist.evaluate --model $ck/hf --config /work/exp_runs/auto-slowgen-p$p-s0/config.yaml \
      --size 200 --samples 4 --generator.vllm '{}' --out $out > $R/eval-p$p-$(basename $ck).log 2>&1
  done
done
echo "=== $(date) done"
