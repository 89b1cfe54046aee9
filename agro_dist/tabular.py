"""Exact softmax policies over K responses per prompt, and the paper's Figure 1.

A policy is a [P, K] tensor of logits: ``pi(. | x_p) = softmax(logits[p])``. Everything here
is exact (sums over the K responses), in float64, and differentiable, so the tests can check
the closed-form gradients of AGRO-MATH.md against autograd and the sample estimators of
``agro_dist.core.losses`` against both. Quantities averaged over prompts use the uniform prompt
distribution.

Figure 1 (paper Section 5.1): data from ``pi_ref`` (off-policy, offline), off-policy AGRO
versus KL-regularised policy gradient, in exact-expectation and sampled (n responses per
prompt per step) modes, tracking ``KL(pi || pi*)``. Run ``python -m agro_dist.tabular --help``.
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass
from typing import Dict, List

import torch

from agro_dist.core.losses import get_loss

Tensor = torch.Tensor


# --------------------------------------------------------------------------- exact quantities


def log_pi(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits, dim=-1)


def pi_star_logp(ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log pi*(y|x) = log pi_ref(y|x) + r(x,y)/beta - log Z(x)."""
    if beta <= 0:
        raise ValueError(f"pi* needs beta > 0, got {beta}")
    return torch.log_softmax(ref_logp + rewards / beta, dim=-1)


def soft_value(ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """V*(x) = beta * log Z(x) [P]: the regularised reward of pi* for every y (Theorem 1)."""
    return beta * torch.logsumexp(ref_logp + rewards / beta, dim=-1)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per prompt [P]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reg_reward(logits: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """R_pi(x, y) = r(x, y) - beta * (log pi(y|x) - log pi_ref(y|x)), [P, K]."""
    return rewards - beta * (log_pi(logits) - ref_logp)


def objective_J(logits: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Eq. (1): E_x [ E_pi r - beta KL(pi || pi_ref) ]."""
    lp = log_pi(logits)
    return ((lp.exp() * rewards).sum(-1) - beta * kl(lp, ref_logp)).mean()


def _var(m_logp: Tensor, v: Tensor) -> Tensor:
    """Var_{y~m}[v(y)] per prompt, for m given by log-probs."""
    m = m_logp.exp()
    mean = (m * v).sum(-1, keepdim=True)
    return (m * (v - mean).square()).sum(-1)


def loss_on(logits: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """L_on = E_x 1/2 Var_{y~pi}[R_pi(x,y)] (both sampling and R depend on theta)."""
    return 0.5 * _var(log_pi(logits), reg_reward(logits, ref_logp, rewards, beta)).mean()


def loss_off(logits: Tensor, mu_logp: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """L_off = E_x 1/2 Var_{y~mu}[R_pi(x,y)], mu fixed."""
    return 0.5 * _var(mu_logp.detach(), reg_reward(logits, ref_logp, rewards, beta)).mean()


def loss_off_over_beta(logits: Tensor, mu_logp: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """L_off / beta less its theta-free part Var_mu[r] / (2 beta); defined at beta = 0.

    ``Var(r - beta lr) / (2 beta) = Var r / (2 beta) - Cov(r, lr) + beta/2 Var lr``; its gradient
    is what the agro_off estimator (convention ``-grad L / beta``) estimates, at any beta >= 0.
    """
    m = mu_logp.detach().exp()
    lr = log_pi(logits) - ref_logp
    mean = lambda v: (m * v).sum(-1, keepdim=True)  # noqa: E731
    cov = (m * (rewards - mean(rewards)) * (lr - mean(lr))).sum(-1)
    return (-cov + 0.5 * beta * _var(mu_logp.detach(), lr)).mean()


def _score_expectation(logits: Tensor, weights: Tensor) -> Tensor:
    """sum_y w(y) grad_logits log pi(y|x), per prompt, for softmax logits: w - pi * sum(w)."""
    pi = log_pi(logits).exp()
    return weights - pi * weights.sum(-1, keepdim=True)


def grad_off_exact(logits: Tensor, mu_logp: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Lemma 3 in closed form: grad L_off = -beta E_mu[(R - V_mu) grad log pi], mean over prompts."""
    with torch.no_grad():
        m = mu_logp.exp()
        R = reg_reward(logits, ref_logp, rewards, beta)
        V = (m * R).sum(-1, keepdim=True)
        return -beta * _score_expectation(logits, m * (R - V)) / logits.shape[0]


def grad_on_exact(logits: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """grad L_on = PD + LR in closed form (AGRO-MATH "Gradients (exact)")."""
    with torch.no_grad():
        p = log_pi(logits).exp()
        R = reg_reward(logits, ref_logp, rewards, beta)
        V = (p * R).sum(-1, keepdim=True)
        s2 = (p * (R - V).square()).sum(-1, keepdim=True)
        pd = -beta * _score_expectation(logits, p * (R - V))
        lr_term = 0.5 * _score_expectation(logits, p * ((R - V).square() - s2))
        return (pd + lr_term) / logits.shape[0]


def grad_kl_pg_exact(logits: Tensor, mu_logp: Tensor, ref_logp: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Expected update direction of KL-regularised PG under mu, as a gradient to *descend*:
    ``-E_mu[(r - E_mu r) grad log pi] + beta grad KL(pi || pi_ref)``, mean over prompts."""
    with torch.no_grad():
        m = mu_logp.exp()
        pg = _score_expectation(logits, m * (rewards - (m * rewards).sum(-1, keepdim=True)))
    x = logits.detach().requires_grad_(True)
    (g_kl,) = torch.autograd.grad(kl(log_pi(x), ref_logp).sum(), x)
    return (-pg + beta * g_kl) / logits.shape[0]


# --------------------------------------------------------------------------- Figure 1


@dataclass
class Figure1Config:
    prompts: int = 4
    arms: int = 10
    beta: float = 0.5
    steps: int = 3000
    n: int = 4
    lr: float = 1.0
    sampled_lr: float = 0.3
    seed: int = 0
    log_every: int = 10


def make_problem(cfg: Figure1Config):
    """Random reference policy and rewards in [0, 1] for ``prompts`` x ``arms`` (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed)
    ref_logp = log_pi(torch.randn(cfg.prompts, cfg.arms, generator=g, dtype=torch.float64))
    rewards = torch.rand(cfg.prompts, cfg.arms, generator=g, dtype=torch.float64)
    return ref_logp, rewards


def _sampled_step_loss(method: str, logits: Tensor, ref_logp: Tensor, rewards: Tensor, cfg, g) -> Tensor:
    """One minibatch from mu = pi_ref through the registry losses (T = 1 token per response)."""
    P, K = logits.shape
    idx = torch.multinomial(ref_logp.exp(), cfg.n, replacement=True, generator=g)  # [P, n]
    lp = log_pi(logits)
    logps = lp.gather(1, idx).reshape(-1, 1)
    ref = ref_logp.gather(1, idx).reshape(-1, 1)
    r = rewards.gather(1, idx).reshape(-1)
    mask = torch.ones_like(logps, dtype=torch.bool)
    if method == "agro":
        loss, _ = get_loss("agro_off")(logps, ref, mask, r, group_size=cfg.n, beta=cfg.beta)
    else:
        # Tabular case of kl_pg: the full-vocabulary KL at the single position is the exact KL.
        token_kl = kl(lp, ref_logp).repeat_interleave(cfg.n).reshape(-1, 1)
        loss, _ = get_loss("kl_pg")(logps, ref, mask, r, group_size=cfg.n, beta=cfg.beta, token_kl=token_kl)
    return loss


def run_figure1(cfg: Figure1Config, modes=("exact", "sampled")) -> List[Dict]:
    """Train from pi = pi_ref with data from mu = pi_ref; return rows of KL(pi || pi*) per step."""
    ref_logp, rewards = make_problem(cfg)
    star = pi_star_logp(ref_logp, rewards, cfg.beta)
    rows: List[Dict] = []
    for mode in modes:
        for method in ("agro", "kl_pg"):
            logits = ref_logp.clone()
            g = torch.Generator().manual_seed(cfg.seed + 1)
            lr = cfg.lr if mode == "exact" else cfg.sampled_lr
            for step in range(cfg.steps + 1):
                if step % cfg.log_every == 0 or step == cfg.steps:
                    lp = log_pi(logits)
                    rows.append(
                        dict(
                            mode=mode,
                            method=method,
                            step=step,
                            kl_to_pi_star=kl(lp, star).mean().item(),
                            objective=objective_J(logits, ref_logp, rewards, cfg.beta).item(),
                            loss_off=loss_off(logits, ref_logp, ref_logp, rewards, cfg.beta).item(),
                        )
                    )
                if step == cfg.steps:
                    break
                if mode == "exact":
                    if method == "agro":
                        grad = grad_off_exact(logits, ref_logp, ref_logp, rewards, cfg.beta) / cfg.beta
                    else:
                        grad = grad_kl_pg_exact(logits, ref_logp, ref_logp, rewards, cfg.beta)
                else:
                    x = logits.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(_sampled_step_loss(method, x, ref_logp, rewards, cfg, g), x)
                # Plain SGD on the logits, same step size for both methods.
                logits = logits - lr * grad * logits.shape[0]
    return rows


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: List[Dict], path: str, cfg: Figure1Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    labels = {"agro": "off-policy AGRO (Eq. 4)", "kl_pg": "KL-regularised PG"}
    for ax, mode in zip(axes[0], modes):
        for method, color in (("agro", "tab:blue"), ("kl_pg", "tab:red")):
            pts = [r for r in rows if r["mode"] == mode and r["method"] == method]
            ax.semilogy([r["step"] for r in pts], [max(r["kl_to_pi_star"], 1e-16) for r in pts], color=color, label=labels[method])
        title = "exact expectation" if mode == "exact" else f"sampled, n={cfg.n} per prompt"
        ax.set_title(f"data from pi_ref, {title}")
        ax.set_xlabel("update step")
        ax.set_ylabel("KL(pi || pi*)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Figure 1: {cfg.prompts} prompts x {cfg.arms} responses, beta={cfg.beta}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt_kl(v: float) -> str:
    # Below ~1e-15 the float64 sum is round-off (it can even come out slightly negative).
    return "<1e-15" if v < 1e-15 else f"{v:.3e}"


def main(argv=None) -> int:
    d = Figure1Config()
    ap = argparse.ArgumentParser(
        prog="python -m agro_dist.tabular",
        description="The paper's Figure 1: off-policy AGRO vs KL-regularised PG on a tabular softmax "
        "policy trained from pi_ref data. Writes figure1.csv and figure1.png.",
    )
    ap.add_argument("--out", default="runs/figure1", help="output folder (default: %(default)s)")
    ap.add_argument("--mode", choices=["exact", "sampled", "both"], default="both", help="default: %(default)s")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="number of prompts (default: %(default)s)")
    ap.add_argument("--arms", type=int, default=d.arms, help="responses per prompt K (default: %(default)s)")
    ap.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=d.steps, help="update steps (default: %(default)s)")
    ap.add_argument("--n", type=int, default=d.n, help="sampled responses per prompt per step (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr, help="SGD step, exact mode (default: %(default)s)")
    ap.add_argument("--sampled-lr", type=float, default=d.sampled_lr, help="SGD step, sampled mode (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    ap.add_argument("--log-every", type=int, default=d.log_every, help="default: %(default)s")
    a = ap.parse_args(argv)
    if a.beta <= 0 or a.n < 2 or a.steps < 1 or a.prompts < 1 or a.arms < 2:
        ap.error("need --beta > 0, --n >= 2, --steps >= 1, --prompts >= 1, --arms >= 2")
    cfg = Figure1Config(a.prompts, a.arms, a.beta, a.steps, a.n, a.lr, a.sampled_lr, a.seed, a.log_every)
    modes = ("exact", "sampled") if a.mode == "both" else (a.mode,)
    rows = run_figure1(cfg, modes)
    os.makedirs(a.out, exist_ok=True)
    csv_path, png_path = os.path.join(a.out, "figure1.csv"), os.path.join(a.out, "figure1.png")
    write_csv(rows, csv_path)
    plot(rows, png_path, cfg)
    print(f"{'mode':8} {'method':7} {'KL(pi||pi*) start':>18} {'end':>10}")
    for mode in modes:
        for method in ("agro", "kl_pg"):
            pts = [r for r in rows if r["mode"] == mode and r["method"] == method]
            print(f"{mode:8} {method:7} {_fmt_kl(pts[0]['kl_to_pi_star']):>18} {_fmt_kl(pts[-1]['kl_to_pi_star']):>10}")
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
