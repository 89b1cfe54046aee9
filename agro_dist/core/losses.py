"""AGRO and its baselines as pure tensor functions, chosen by name.

Every loss has the signature::

    loss, metrics = fn(logps, ref_logps, mask, rewards, *, group_size, beta, **options)

    logps      [B, T]  log pi(y_t | x, y_<t) under the policy; carries gradient
    ref_logps  [B, T]  the same under pi_ref; detached here whatever the caller passes
    mask       [B, T]  1 on response tokens, 0 on padding (bool or 0/1)
    rewards    [B]     one scalar per response
    rows are grouped by prompt: B = num_prompts * group_size, each prompt's rows contiguous.

Convention. ``loss`` is the mean over prompts of a per-prompt surrogate whose gradient is
minus the estimator ``g`` of ``shared/docs/AGRO-MATH.md`` (with its ``1/n sum_i`` inside
each prompt). ``g`` estimates ``-grad L / beta`` for the AGRO losses (so ``beta -> 0`` stays
defined) and ``grad J`` for the policy-gradient baselines, so *minimising* ``loss`` with any
optimiser follows the method. Sequence log-probs are sums over masked tokens. Coefficients
(advantages) are stop-gradient; only ``log pi`` carries gradient, except where a docstring
says otherwise (``kl_pg``'s KL term, ``agro_single``'s value, ``dpo``, ``grpo``).

Padding is inert: masked entries of every [B, T] input are replaced by 0 before any
arithmetic, so garbage (even NaN/inf) in padded slots changes neither loss nor gradient.

``metrics`` maps names to detached 0-dim tensors (no host sync here; the caller decides
when to call ``.item()``). Every loss reports ``reward_mean``, ``reg_reward_mean``
(mean of ``R = r - beta * lr``), ``log_ratio_mean`` (mean sequence ``lr``: a KL(pi||pi_ref)
estimate when the data is on-policy), ``response_len_mean`` and its loss parts
(``loss_*``, which add up to ``loss``).

Paper equations (Tang et al., "RL-finetuning LLMs from on- and off-policy data with a single
algorithm"): see each function and ``docs/losses.md``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

Tensor = torch.Tensor
Metrics = Dict[str, Tensor]
LossFn = Callable[..., Tuple[Tensor, Metrics]]

LOSSES: Dict[str, LossFn] = {}

KL_ESTIMATORS = ("sequence", "causal", "local")
LR_BASELINES = ("none", "loo", "loo_var")


def register(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    """The loss function registered under ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


def needs_token_kl(name: str, **options) -> bool:
    """Whether ``name`` with ``options`` needs ``token_kl`` (full-vocabulary KL per position).

    The learner computes that [B, T] tensor only when asked, since it costs a pass over the
    vocabulary for both models.
    """
    get_loss(name)
    return name == "kl_pg" or options.get("kl_estimator") == "local"


def min_group_size(name: str) -> int:
    """Smallest group a loss can use: 2 for the leave-one-out baselines (and DPO's pairs, GRPO's
    group std), 1 for ``agro_single`` (its value head is the baseline)."""
    get_loss(name)
    return 1 if name == "agro_single" else 2


# Losses whose estimator assumes y ~ pi, the current policy (docs/losses.md, "data"): agro_on's
# likelihood-ratio term differentiates the sampling distribution, rloo estimates grad J only
# on-policy. kl_pg (the paper's off-policy baseline, shown failing there) and grpo (its ratio
# corrects near-on-policy data) stay allowed on any data, as the paper and TRL use them.
ON_POLICY_LOSSES = ("agro_on", "rloo")


def needs_on_policy_data(name: str, **options) -> bool:
    """Whether ``name`` with ``options`` is valid only for samples of the current policy: the
    driver refuses it for stale (async), replayed, logged (offline) and pi_ref (frozen) data.
    The causal and local KL estimators (options of the two) are on-policy too."""
    get_loss(name)
    return name in ON_POLICY_LOSSES or options.get("kl_estimator", "sequence") != "sequence"


def needs_behaviour_logprobs(name: str) -> bool:
    """Whether a loss uses the sampler's log-probs: ``grpo``'s ratio ``pi / mu`` (its
    ``old_logps``). AGRO's losses never do."""
    get_loss(name)
    return name == "grpo"


# --------------------------------------------------------------------------- validation


def _check(
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    beta: float,
    *,
    loss: str,
    min_group_size: int = 2,
) -> Tuple[Tensor, Tensor, Tensor, int, float]:
    """Validate the common inputs; return (logps, ref_logps, bool mask) with padding zeroed."""
    if not isinstance(logps, Tensor) or logps.dim() != 2:
        raise ValueError(f"{loss}: logps must be a 2-D tensor [B, T], got {_shape(logps)}")
    B, T = logps.shape
    for name, t in (("ref_logps", ref_logps), ("mask", mask)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (B, T):
            raise ValueError(f"{loss}: {name} must have the shape of logps {(B, T)}, got {_shape(t)}")
    if not isinstance(rewards, Tensor) or tuple(rewards.shape) != (B,):
        raise ValueError(f"{loss}: rewards must have shape [B] = ({B},), got {_shape(rewards)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{loss}: group_size must be an int, got {group_size!r}")
    if group_size < min_group_size:
        why = " (the leave-one-out baseline needs n >= 2)" if min_group_size == 2 else ""
        raise ValueError(f"{loss}: group_size must be >= {min_group_size}{why}, got {group_size}")
    if B == 0 or B % group_size != 0:
        raise ValueError(
            f"{loss}: batch size B={B} is not a positive multiple of group_size={group_size}; "
            "rows must come in whole groups (one prompt's completions contiguous)"
        )
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{loss}: beta must be finite and >= 0, got {beta}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"{loss}: rewards must be finite; non-finite at rows {bad[:10]}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{loss}: mask must hold only 0 and 1")
        mask = mask != 0
    return _zero_pad(logps, mask), _zero_pad(ref_logps.detach(), mask), mask, B // group_size, beta


def _check_extra(name: str, t, B: int, T: int | None, *, loss: str) -> None:
    want = (B,) if T is None else (B, T)
    if not isinstance(t, Tensor) or tuple(t.shape) != want:
        raise ValueError(f"{loss}: {name} must have shape {list(want)}, got {_shape(t)}")


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _zero_pad(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not x * mask: 0 * inf = nan, and where's backward sends exactly 0 to padding.
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------- shared pieces


def _loo_mean(x: Tensor) -> Tensor:
    """Leave-one-out mean along dim 1 of a [P, n, ...] tensor: b_i = 1/(n-1) sum_{j != i} x_j."""
    n = x.shape[1]
    return (x.sum(1, keepdim=True) - x) / (n - 1)


def _loo_var(x: Tensor) -> Tensor:
    """Leave-one-out unbiased sample variance along dim 1 of [P, n] (n >= 3): for each i, the
    variance (divisor n - 2) of the other n - 1 values."""
    n = x.shape[1]
    m = _loo_mean(x)  # [P, n]: the others' mean for each i
    dev2 = (x[:, None, :] - m[:, :, None]).square()  # [P, i, j] = (x_j - m_i)^2, centred: no cancellation
    return (dev2.sum(-1) - dev2.diagonal(dim1=1, dim2=2)) / (n - 2)


def _reg_coefficients(lr_tok: Tensor, mask: Tensor, estimator: str, token_kl: Tensor | None) -> Tensor:
    """Per-token coefficients C [B, T] of the KL-gradient estimators (AGRO-MATH, Section 6).

    ``sum_t C_t * grad log pi(y_t | .)`` is g1, g2 or g3, each an unbiased estimate of
    ``grad KL(pi || pi_ref)`` from one on-policy sample:

    - ``sequence`` (g1): ``C_t = lr(y)`` at every t (also past the end, so that a
      leave-one-out mean of C over other rows is the sequence baseline at every position).
    - ``causal`` (g2): ``C_t = sum_{t' >= t} lr_t'`` (drops the zero-mean t' < t terms).
    - ``local`` (g3): ``C_t = lr_t + sum_{t' > t} KL_t'`` (future log-ratios replaced by their
      one-step expectation, the full-vocabulary KL at each later position).
    """
    if estimator == "sequence":
        return lr_tok.sum(-1, keepdim=True).expand_as(lr_tok)
    if estimator == "causal":
        return _reverse_cumsum(lr_tok)
    if estimator == "local":
        kl = _zero_pad(token_kl.detach(), mask)
        return lr_tok + _reverse_cumsum(kl) - kl
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _reverse_cumsum(x: Tensor) -> Tensor:
    return x.flip(-1).cumsum(-1).flip(-1)


def kl_surrogate(
    logps: Tensor, ref_logps: Tensor, mask: Tensor, *, estimator: str = "sequence", token_kl: Tensor | None = None
) -> Tensor:
    """Per-row surrogate [B] whose gradient is the estimator g1/g2/g3 of grad KL(pi||pi_ref).

    Valid for on-policy samples only (Section 6 of the paper). Exposed for tests and analysis;
    the losses use the same coefficients through ``kl_estimator``.
    """
    B, T = logps.shape
    mask = mask.bool()
    logps, ref = _zero_pad(logps, mask), _zero_pad(ref_logps.detach(), mask)
    if estimator == "local":
        _check_extra("token_kl", token_kl, B, T, loss="kl_surrogate")
    C = _reg_coefficients((logps - ref).detach(), mask, estimator, token_kl)
    return (C * logps).sum(-1)


def _common_metrics(rewards: Tensor, lr: Tensor, mask: Tensor, beta: float) -> Metrics:
    r, lr = rewards.detach().to(lr.dtype), lr.detach()  # lr is float32 or float64 (see _zero_pad)
    return {
        "reward_mean": r.mean(),
        "reg_reward_mean": (r - beta * lr).mean(),
        "log_ratio_mean": lr.mean(),
        "response_len_mean": mask.sum(-1).to(lr.dtype).mean(),
    }


def _pd_surrogate(
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    rewards: Tensor,
    n: int,
    beta: float,
    estimator: str,
    token_kl: Tensor | None,
    *,
    loss: str,
) -> Tuple[Tensor, Metrics, Tensor]:
    """The pathwise (PD) part shared by agro_off, agro_on and rloo.

    Per-token advantage ``A_it = (r_i - b^r_i) - beta * (C_it - LOO_j C_jt)`` with b^r the
    leave-one-out mean of the rewards and C the KL-estimator coefficients. For
    ``estimator="sequence"`` it is ``R_i - b_i`` at every token: exactly Eq. (4). Returns the
    surrogate ``-1/B sum_i sum_t A_it log pi(y_it)`` split into reward and regulariser parts,
    the metrics, and the detached advantages ``R_i - b_i`` [P, n] (for the LR term).
    """
    B, T = logps.shape
    if estimator == "local":
        _check_extra("token_kl", token_kl, B, T, loss=loss)
    lr_tok = (logps - ref_logps).detach()
    lr = lr_tok.sum(-1)
    r = rewards.to(logps.dtype)
    adv_r = (r.view(-1, n) - _loo_mean(r.view(-1, n))).reshape(B, 1)
    C = _reg_coefficients(lr_tok, mask, estimator, token_kl)
    adv_reg = (C.view(-1, n, T) - _loo_mean(C.view(-1, n, T))).reshape(B, T)

    loss_pg = -(adv_r * logps).sum() / B
    loss_reg = beta * (adv_reg * logps).sum() / B

    R = (r - beta * lr).view(-1, n)
    adv = R - _loo_mean(R)
    metrics = _common_metrics(rewards, lr, mask, beta)
    # Unbiased estimate of l(pi; x, m) = 1/2 Var_m[R]: zero at pi*, the quantity AGRO drives down.
    metrics["consistency_loss"] = (0.5 * R.var(dim=1, correction=1)).mean().detach()
    metrics["loss_pg"] = loss_pg.detach()
    metrics["loss_reg"] = loss_reg.detach()
    return loss_pg + loss_reg, metrics, adv


# --------------------------------------------------------------------------- losses


@register("agro_off")
def agro_off(logps, ref_logps, mask, rewards, *, group_size: int, beta: float) -> Tuple[Tensor, Metrics]:
    """Off-policy AGRO, Eq. (4): ``g = 1/n sum_i (R_i - b_i) grad log pi(y_i|x)``.

    ``R_i = r_i - beta * lr_i``, ``b_i`` the leave-one-out mean of the other R_j. Unbiased for
    ``-grad L_off / beta`` (Lemma 3) under *any* behaviour policy mu: stale rollouts, replay,
    logged data. No importance weights. ``beta = 0`` gives REINFORCE with a LOO baseline.
    Equivalently: the gradient of ``1/(2 beta (n-1)) sum_i (R_i - mean R)^2``.
    Only the sequence-level (g1) KL estimator applies off-policy, so there is no option.
    """
    logps, ref_logps, mask, _, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="agro_off")
    loss, metrics, _ = _pd_surrogate(logps, ref_logps, mask, rewards, group_size, beta, "sequence", None, loss="agro_off")
    return loss, metrics


@register("agro_on")
def agro_on(
    logps,
    ref_logps,
    mask,
    rewards,
    *,
    group_size: int,
    beta: float,
    lr_baseline: str = "none",
    kl_estimator: str = "sequence",
    token_kl: Tensor | None = None,
) -> Tuple[Tensor, Metrics]:
    """On-policy AGRO, Eq. (6): ``g_on = g_PD + g_LR``; samples must come from the current pi.

    - ``g_PD`` = Eq. (5): off-policy AGRO applied to on-policy samples, with the KL part
      estimated by ``kl_estimator`` (Section 6: ``sequence`` = g1, ``causal`` = g2,
      ``local`` = g3 which needs ``token_kl`` [B, T]).
    - ``g_LR = -1/(2 beta) * 1/n sum_i q_i grad log pi(y_i|x)``, ``q_i = (R_i - b_i)^2``:
      the likelihood-ratio term from differentiating the sampling distribution.
      ``lr_baseline="loo"`` subtracts the leave-one-out mean of the other q_j (the paper's
      lower-variance variant, Section 5.2; biased because b_j contains R_i).
      ``lr_baseline="loo_var"`` subtracts ``n/(n-1) * s2_{-i}``, the unbiased sample variance of
      the *other* n - 1 regularised rewards scaled by ``n/(n-1)`` (needs ``n >= 3``): the paper's
      "subtract the variance of R as a baseline without introducing bias" (Section 4.2). Since
      ``E[q_i | y_i] = (R_i - V)^2 + s2/(n-1)`` and ``E[n/(n-1) s2_{-i}] = s2 + s2/(n-1)``, the
      coefficient's expectation is ``(R_i - V)^2 - s2``, the LR term with its free baseline
      ``s2`` (AGRO-MATH, "Gradients"); the baseline does not depend on ``y_i``, so no bias.

    Unbiased for ``-grad L_on / beta`` (Proposition 4) with ``lr_baseline="none"`` or ``"loo_var"``.
    ``beta`` must be > 0 (``g_LR`` is scaled by 1/beta): use ``agro_off`` for ``beta = 0``.
    """
    if float(beta) == 0.0:
        raise ValueError(
            "agro_on: beta must be > 0 (its likelihood-ratio term is scaled by 1/(2 beta)); "
            "for beta = 0 use agro_off, which is REINFORCE with a leave-one-out baseline"
        )
    if lr_baseline not in LR_BASELINES:
        raise ValueError(f"agro_on: lr_baseline must be one of {', '.join(LR_BASELINES)}, got {lr_baseline!r}")
    if lr_baseline == "loo_var" and group_size < 3:
        raise ValueError(f"agro_on: lr_baseline 'loo_var' estimates the variance of R from the other n - 1 samples of a group: "
                         f"it needs n >= 3 (generator.n), got group_size {group_size}")
    logps, ref_logps, mask, _, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="agro_on")
    B, T = logps.shape
    loss_pd, metrics, adv = _pd_surrogate(logps, ref_logps, mask, rewards, group_size, beta, kl_estimator, token_kl, loss="agro_on")
    q = adv.square()
    if lr_baseline == "loo":
        q = q - _loo_mean(q)
    elif lr_baseline == "loo_var":
        R = rewards.to(logps.dtype) - beta * (logps - ref_logps).detach().sum(-1)  # padding is zero (_check)
        q = q - group_size / (group_size - 1) * _loo_var(R.view(-1, group_size))
    loss_lr = (q.reshape(B) * logps.sum(-1)).sum() / (2 * beta * B)
    metrics["loss_lr"] = loss_lr.detach()
    return loss_pd + loss_lr, metrics


@register("rloo")
def rloo(
    logps,
    ref_logps,
    mask,
    rewards,
    *,
    group_size: int,
    beta: float,
    kl_estimator: str = "sequence",
    token_kl: Tensor | None = None,
) -> Tuple[Tensor, Metrics]:
    """RLOO / regularised policy gradient (Ahmadian et al. 2024; paper Section 5.2).

    Advantage ``R_i - b_i`` with the sequence-level KL inside the reward ``R = r - beta * lr``
    and leave-one-out baseline: an unbiased estimate of ``grad J`` (Eq. 1) for on-policy
    samples. With ``kl_estimator="sequence"`` it computes the same gradient as ``agro_off``
    (the paper: equal within seed noise on-policy); ``causal``/``local`` use g2/g3 for the
    KL part (on-policy only). Off-policy it has no such guarantee: use ``agro_off``.
    """
    logps, ref_logps, mask, _, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="rloo")
    loss, metrics, _ = _pd_surrogate(logps, ref_logps, mask, rewards, group_size, beta, kl_estimator, token_kl, loss="rloo")
    return loss, metrics


@register("kl_pg")
def kl_pg(
    logps, ref_logps, mask, rewards, *, group_size: int, beta: float, token_kl: Tensor | None = None
) -> Tuple[Tensor, Metrics]:
    """KL-regularised policy gradient adapted to off-policy data (paper Section 5.1, Fig. 1).

    ``loss = -1/n sum_i sg(r_i - b^r_i) log pi(y_i) + beta * 1/n sum_i sum_t KL_t(y_i)`` with
    ``b^r_i`` the leave-one-out mean of the raw rewards and ``token_kl`` [B, T] the
    full-vocabulary ``KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t))`` at each position, *with gradient*
    (differentiated directly, as in "KL in the loss"). The baseline the paper shows does not
    converge to pi* from off-policy data; kept for comparison.
    """
    logps, ref_logps, mask, _, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="kl_pg")
    B, T = logps.shape
    _check_extra("token_kl", token_kl, B, T, loss="kl_pg")
    n = group_size
    r = rewards.to(logps.dtype).view(-1, n)
    adv_r = (r - _loo_mean(r)).reshape(B)
    loss_pg = -(adv_r * logps.sum(-1)).sum() / B
    kl = _zero_pad(token_kl, mask).sum(-1)
    loss_kl = beta * kl.sum() / B
    lr = (logps - ref_logps).detach().sum(-1)
    metrics = _common_metrics(rewards, lr, mask, beta)
    metrics.update(loss_pg=loss_pg.detach(), loss_kl=loss_kl.detach(), token_kl_sum_mean=kl.detach().mean())
    return loss_pg + loss_kl, metrics


@register("grpo")
def grpo(
    logps,
    ref_logps,
    mask,
    rewards,
    *,
    group_size: int,
    beta: float,
    old_logps: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    scale_rewards: bool = True,
    std_eps: float = 1e-4,
    loss_agg: str = "seq_mean",
) -> Tuple[Tensor, Metrics]:
    """GRPO (Shao et al. 2024, DeepSeekMath Eq. 3), TRL's conventions where they differ.

    - Advantage ``A_i = (r_i - mean_g r) / (std_g r + std_eps)``: group mean and the
      *unbiased* group std (``torch.std``, as TRL), ``std_eps = 1e-4`` (TRL);
      ``scale_rewards=False`` keeps ``r_i - mean`` only (Dr. GRPO).
    - Per token: ``-min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps_high) A_i) + beta * k3_t`` with
      ``rho_t = exp(log pi - old_logps)`` (``old_logps`` defaults to ``logps.detach()``: one
      update per batch, rho = 1) and ``k3_t = exp(ref - log pi) - (ref - log pi) - 1``
      (Schulman's k3, DeepSeekMath Eq. 4), differentiated directly.
    - ``loss_agg="seq_mean"``: mean over each response's tokens, then over responses
      (DeepSeekMath; TRL ``loss_type="grpo"``); ``"token_mean"``: mean over all tokens of the
      batch (DAPO; TRL ``"bnpo"``).
    A heuristic baseline: no claim of convergence to pi* off-policy.
    """
    logps, ref_logps, mask, _, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="grpo")
    B, T = logps.shape
    if old_logps is None:
        old_logps = logps.detach()
    else:
        _check_extra("old_logps", old_logps, B, T, loss="grpo")
        old_logps = _zero_pad(old_logps.detach(), mask)
    if not clip_eps > 0:
        raise ValueError(f"grpo: clip_eps must be > 0, got {clip_eps}")
    eps_hi = clip_eps if clip_eps_high is None else clip_eps_high
    if loss_agg not in ("seq_mean", "token_mean"):
        raise ValueError(f"grpo: loss_agg must be 'seq_mean' or 'token_mean', got {loss_agg!r}")
    n = group_size
    r = rewards.to(logps.dtype).view(-1, n)
    adv = r - r.mean(1, keepdim=True)
    if scale_rewards:
        adv = adv / (r.std(1, keepdim=True) + std_eps)
    adv = adv.reshape(B, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_hi)
    pg_tok = -torch.minimum(ratio * adv, clipped * adv)
    d = ref_logps - logps
    k3_tok = torch.exp(d) - d - 1
    m = mask.to(logps.dtype)
    if loss_agg == "seq_mean":
        agg = lambda x: ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()  # noqa: E731
    else:
        agg = lambda x: (x * m).sum() / m.sum().clamp(min=1)  # noqa: E731
    loss_pg, loss_kl = agg(pg_tok), beta * agg(k3_tok)
    lr = (logps - ref_logps).detach().sum(-1)
    metrics = _common_metrics(rewards, lr, mask, beta)
    is_clipped = ((ratio - clipped).abs() > 0) & mask
    metrics.update(
        loss_pg=loss_pg.detach(),
        loss_kl=loss_kl.detach(),
        k3_mean=agg(k3_tok).detach(),
        clip_frac=(is_clipped.sum() / mask.sum().clamp(min=1)).detach().float(),
        advantage_abs_mean=adv.abs().mean().detach(),
    )
    return loss_pg + loss_kl, metrics


@register("agro_single")
def agro_single(
    logps, ref_logps, mask, rewards, *, group_size: int = 1, beta: float, values: Tensor | None = None
) -> Tuple[Tensor, Metrics]:
    """AGRO with one response per prompt (paper Section 5.1, n = 1; Richemond et al. 2024).

    Minimises jointly over theta and the value head ``V_phi(x)`` (``values`` [B], carries its
    own gradient) the squared consistency loss ``1/(2 beta) (r - beta * lr - V)^2``. In this
    module's convention the theta-part is its gradient times 1 (``-(R - V) grad log pi``, the
    same scale as Eq. 4) and the value part is ``1/2 (R - V)^2`` (its 1/beta is a
    learning-rate choice for phi), so ``beta = 0`` stays defined. Optimum: pi* with
    ``V = beta log Z(x)``. Each row is its own prompt; ``group_size`` only checks B.
    """
    logps, ref_logps, mask, _, beta = _check(
        logps, ref_logps, mask, rewards, group_size, beta, loss="agro_single", min_group_size=1
    )
    B, _ = logps.shape
    _check_extra("values", values, B, None, loss="agro_single")
    lr = (logps - ref_logps).sum(-1)
    R = rewards.to(logps.dtype) - beta * lr.detach()
    v = values.to(logps.dtype)
    loss_policy = -((R - v.detach()) * logps.sum(-1)).sum() / B
    loss_value = 0.5 * (R - v).square().sum() / B
    metrics = _common_metrics(rewards, lr.detach(), mask, beta)
    metrics.update(loss_policy=loss_policy.detach(), loss_value=loss_value.detach(), value_mean=v.detach().mean())
    return loss_policy + loss_value, metrics


@register("dpo")
def dpo(logps, ref_logps, mask, rewards, *, group_size: int, beta: float) -> Tuple[Tensor, Metrics]:
    """Pairwise preference loss from generation consistency (paper Section 7; DPO).

    Theorem 1 gives ``r(y_w) - r(y_l) = beta * (lr(y_w) - lr(y_l))`` at the optimum; with a
    Bradley-Terry model this is ``-log sigmoid(beta * (lr_w - lr_l))`` (Rafailov et al.).
    Within each group every ordered pair with ``r_w > r_l`` is a (chosen, rejected) pair
    (``group_size = 2`` with rewards 1/0 is classic DPO); ties give no pair. Per prompt: mean
    over its pairs (0 if none); then mean over prompts. Gradient flows through both
    sequence log-probs. ``beta`` must be > 0.
    """
    if float(beta) == 0.0:
        raise ValueError("dpo: beta must be > 0 (the preference logit is beta * (lr_w - lr_l))")
    logps, ref_logps, mask, P, beta = _check(logps, ref_logps, mask, rewards, group_size, beta, loss="dpo")
    n = group_size
    lr = (logps - ref_logps).sum(-1).view(P, n)
    r = rewards.view(P, n)
    is_pair = (r.unsqueeze(2) > r.unsqueeze(1)).to(logps.dtype)  # [P, w, l]
    margin = beta * (lr.unsqueeze(2) - lr.unsqueeze(1))
    per_pair = -torch.nn.functional.logsigmoid(margin) * is_pair
    pairs = is_pair.sum((1, 2))
    loss = (per_pair.sum((1, 2)) / pairs.clamp(min=1)).mean()
    metrics = _common_metrics(rewards, lr.detach().reshape(-1), mask, beta)
    total = pairs.sum().clamp(min=1)
    metrics.update(
        loss_pref=loss.detach(),
        pairs=pairs.sum().detach(),
        pair_accuracy=(((margin > 0).to(logps.dtype) * is_pair).sum() / total).detach(),
        margin_mean=((margin * is_pair).sum() / total).detach(),
    )
    return loss, metrics
