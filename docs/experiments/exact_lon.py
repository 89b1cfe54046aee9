"""Where the exact gradient flows of L_on and L_off (mu = pi) go on a bandit from pi_ref.

One prompt, K = 50 responses, one right answer (reward 1) with pi_ref probability p0, the others
reward 0; 4000 steps of size 1 along -grad L / beta from pi_ref (agro_dist.tabular's closed forms,
float64). L_off at mu = pi is the RL gradient of J (= agro_off = rloo on-policy); L_on adds the
likelihood-ratio term of Proposition 4. Prints P(right) and KL(pi || pi_ref) where each ends, and
pi*'s. Run: python docs/experiments/exact_lon.py (a second or two).
"""

import torch

from agro_dist import tabular as T

torch.set_default_dtype(torch.float64)
K, STEPS = 50, 4000
print("| beta | p0 = pi_ref(right) | pi*: P(right), KL | L_off flow: P(right), KL | L_on flow: P(right), KL |")
print("|---|---|---|---|---|")
for beta in (0.05, 0.1, 0.2, 0.5, 1.0):
    for p0 in (0.08, 0.35):
        ref = torch.full((1, K), (1 - p0) / (K - 1))
        ref[0, 0] = p0
        ref_logp, r = ref.log(), torch.zeros(1, K)
        r[0, 0] = 1.0
        ends = {}
        for method in ("off", "on"):
            logits = ref_logp.clone()
            for _ in range(STEPS):
                g = (T.grad_on_exact(logits, ref_logp, r, beta) if method == "on"
                     else T.grad_off_exact(logits, T.log_pi(logits), ref_logp, r, beta))
                logits = logits - g / beta
            lp = T.log_pi(logits)
            ends[method] = f"{lp.exp()[0, 0]:.3f}, {T.kl(lp, ref_logp).item():.3f}"
        star = T.pi_star_logp(ref_logp, r, beta)
        print(f"| {beta} | {p0} | {star.exp()[0, 0]:.3f}, {T.kl(star, ref_logp).item():.3f} | {ends['off']} | {ends['on']} |")
