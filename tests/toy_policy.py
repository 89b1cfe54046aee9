"""A tiny autoregressive policy that can be enumerated, and a Monte-Carlo gradient harness.

Vocabulary {0 = EOS, 1, 2}, at most L = 3 tokens: a response ends at EOS or is cut at length
3, so there are 15 responses of lengths 1..3 (padding is real) and 7 contexts (the prefixes
without EOS). The policy is a table of logits theta [P, 7, 3], one softmax per prompt and
context. Exact sequence log-probs are differentiable in theta, so every exact loss of
``agro_dist.tabular`` applied to the 15 sequence log-probs gives exact gradients in theta by
autograd; the sample estimators of ``agro_dist.core.losses`` are checked against those.
"""

from __future__ import annotations

import itertools
import math

import torch

V, L, EOS = 3, 3, 0


def _enumerate():
    seqs = []
    for length in range(1, L + 1):
        for toks in itertools.product(range(V), repeat=length):
            # EOS only as the last token; a length-L response may end without EOS (cut).
            if EOS in toks[:-1] or (length < L and toks[-1] != EOS):
                continue
            seqs.append(toks)
    contexts = sorted({s[:t] for s in seqs for t in range(len(s))}, key=lambda c: (len(c), c))
    cid = {c: i for i, c in enumerate(contexts)}
    S = len(seqs)
    tokens = torch.zeros(S, L, dtype=torch.long)
    ctx = torch.zeros(S, L, dtype=torch.long)
    mask = torch.zeros(S, L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        for t, tok in enumerate(s):
            tokens[i, t], ctx[i, t], mask[i, t] = tok, cid[s[:t]], True
    return seqs, contexts, tokens, ctx, mask


SEQS, CONTEXTS, TOKENS, CTX, MASK = _enumerate()
S, C = len(SEQS), len(CONTEXTS)
assert (S, C) == (15, 7)


def token_logp_table(theta: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | context) [..., P, S, L] for every enumerated sequence (0 on padding)."""
    lp = torch.log_softmax(theta, -1)  # [..., P, C, V]
    per = lp[..., CTX, TOKENS]  # [..., P, S, L]
    return torch.where(MASK, per, torch.zeros((), dtype=per.dtype))


def seq_logp(theta: torch.Tensor) -> torch.Tensor:
    """Exact log pi(y | x) [P, S]; sums to 1 over S after exp."""
    return token_logp_table(theta).sum(-1)


def context_kl(theta: torch.Tensor, ref_theta: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(pi(.|c) || pi_ref(.|c)) per context [..., P, C], with gradient."""
    lp, lq = torch.log_softmax(theta, -1), torch.log_softmax(ref_theta, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def random_problem(P=2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: scale * torch.randn(P, C, V, generator=g, dtype=torch.float64)  # noqa: E731
    theta, ref_theta, mu_theta = mk(), mk(), mk()
    rewards = torch.rand(P, S, generator=g, dtype=torch.float64)
    return theta, ref_theta, mu_theta, rewards


def mc_gradients(loss_fn, theta, ref_theta, sampler_theta, rewards, *, n, draws, beta, seed, options=None, garbage=True):
    """Per-draw gradients [draws, P*C*V] of ``loss_fn`` on fresh samples.

    Each draw takes ``n`` responses per prompt from ``sampler_theta`` (mu, or theta itself for
    on-policy checks) and builds the learner's tensors: logps [B, L] carrying gradient, ref
    log-probs, the padding mask (padded slots filled with NaN/inf/huge garbage when
    ``garbage``), rewards, and ``token_kl`` [B, L] (full-vocabulary KL at each position).
    All draws share one backward pass: theta is replicated per draw, the batch holds
    draws * P prompts, and since the loss is a mean over prompts, the gradient of draw m's
    copy times ``draws`` is that draw's estimate (a mean over its P prompts).
    """
    P = theta.shape[0]
    g = torch.Generator().manual_seed(seed)
    probs = seq_logp(sampler_theta).exp()  # [P, S]
    idx = torch.multinomial(probs.repeat(draws, 1), n, replacement=True, generator=g).view(draws, P, n)
    th = theta.detach().expand(draws, P, C, V).clone().requires_grad_(True)
    lp_all = torch.log_softmax(th, -1)
    ref_all = torch.log_softmax(ref_theta, -1)
    m_i = torch.arange(draws).view(draws, 1, 1, 1)
    p_i = torch.arange(P).view(1, P, 1, 1)
    c, y, mask = CTX[idx], TOKENS[idx], MASK[idx]  # [draws, P, n, L]
    logps = lp_all[m_i, p_i, c, y]
    ref_logps = ref_all[p_i.squeeze(0), c, y]
    token_kl = context_kl(th, ref_theta)[m_i, p_i, c]
    if garbage:
        junk = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -7.0], dtype=theta.dtype)
        fill = junk[torch.randint(len(junk), mask.shape, generator=g)]
        logps = torch.where(mask, logps, fill)
        ref_logps = torch.where(mask, ref_logps, fill.flip(-1))
        token_kl = torch.where(mask, token_kl, fill)
    r = rewards[torch.arange(P).view(1, P, 1), idx]
    B = draws * P * n
    opts = dict(options or {})
    if opts.pop("with_token_kl", False):
        opts["token_kl"] = token_kl.reshape(B, L)
    loss, _ = loss_fn(
        logps.reshape(B, L), ref_logps.reshape(B, L), mask.reshape(B, L), r.reshape(B), group_size=n, beta=beta, **opts
    )
    loss.backward()
    return th.grad.reshape(draws, -1) * draws


def exact_grad(fn, theta) -> torch.Tensor:
    """Autograd of a scalar function of theta, flattened."""
    x = theta.detach().clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(fn(x), x)
    return gx.reshape(-1)


def max_z(per_draw: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |MC mean - exact| in standard errors over coordinates.

    A coordinate with zero sample variance (e.g. a gradient that is identically 0) must match
    to 1e-9, else it counts as infinitely many standard errors.
    """
    M = per_draw.shape[0]
    mean = per_draw.mean(0)
    se = per_draw.std(0) / math.sqrt(M)
    diff = (mean - exact).abs()
    z = torch.where(se > 0, diff / se.clamp(min=1e-300), torch.where(diff < 1e-9, 0.0, math.inf))
    return z.max().item()


def total_variance(per_draw: torch.Tensor) -> float:
    """Trace of the covariance of the per-draw gradient."""
    return per_draw.var(0).sum().item()


def variance_reduction_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """How many standard errors Var(a) exceeds Var(b) (traces), paired over the same draws.

    d_m = |a_m - mean a|^2 - |b_m - mean b|^2 has mean tr Cov(a) - tr Cov(b); the z-score is
    its mean over its standard error. > 4 means b has lower variance beyond sampling noise.
    """
    d = (a - a.mean(0)).square().sum(1) - (b - b.mean(0)).square().sum(1)
    return (d.mean() / (d.std() / math.sqrt(d.shape[0]))).item()
