"""Token log-probabilities without materialising float32 logits for the whole batch.

A causal LM's log-probs need ``logits = h @ W.T`` over the vocabulary at every position: for
SmolLM2 (49,152 tokens) and 16 x 1024 positions that is 3.2 GB in float32, twice with the
gradient. ``chunked_logprobs`` computes them ``chunk`` positions at a time and recomputes each
chunk's logits in the backward pass (a custom autograd function), so the peak extra memory is
one chunk of logits, not the batch's. Only the positions the loss needs (response tokens) are
computed at all.

Every function takes the sampling ``temperature`` T: the policy scored is ``softmax(logits / T)``,
the distribution a generator sampling at T draws from (TRL, verl and OpenRLHF divide the same
way), so on-policy data is on-policy for the learner too. T = 1 is the model's own distribution.

The same pass gives, without gradient, the entropy of the policy at each position (a metric).
``token_kl`` computes the full-vocabulary KL(pi || pi_ref) per position *with* gradient, for
the losses that need it (``kl_pg`` and the ``local`` estimator); it keeps each chunk's graph,
so it costs more memory and is computed only when asked.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


class _ChunkedLogProb(torch.autograd.Function):
    """logp[i] = log softmax(h[i] @ W.T / T)[y[i]], computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, y: Tensor, chunk: int, want_entropy: bool, inv_t: float):
        N = h.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        ent = torch.empty(N, dtype=torch.float32, device=h.device) if want_entropy else None
        Wf = W.float()
        for s in range(0, N, chunk):
            logits = h[s:s + chunk].float() @ Wf.T
            if inv_t != 1.0:
                logits = logits * inv_t
            l = torch.logsumexp(logits, dim=-1)
            lse[s:s + chunk] = l
            logp[s:s + chunk] = logits.gather(1, y[s:s + chunk, None]).squeeze(1) - l
            if want_entropy:
                p = torch.exp(logits - l[:, None])
                ent[s:s + chunk] = l - (p * logits).sum(-1)
        ctx.save_for_backward(h, W, y, lse)
        ctx.chunk = chunk
        ctx.inv_t = inv_t
        if want_entropy:
            ctx.mark_non_differentiable(ent)
            return logp, ent
        return logp, torch.empty(0, device=h.device)

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_ent: Tensor):
        h, W, y, lse = ctx.saved_tensors
        chunk, inv_t = ctx.chunk, ctx.inv_t
        Wf = W.float()
        grad_h = torch.zeros_like(h, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_W = torch.zeros_like(Wf) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk].float()
            g = grad_logp[s:s + chunk].float()
            # d logp / d z = onehot(y) - softmax(z) for the tempered logits z = h W^T / T,
            # and d z / d(h W^T) = 1 / T.
            z = hc @ Wf.T
            if inv_t != 1.0:
                z = z * inv_t
            dlogits = -torch.exp(z - lse[s:s + chunk, None]) * g[:, None]
            dlogits.scatter_add_(1, y[s:s + chunk, None], g[:, None])
            if inv_t != 1.0:
                dlogits = dlogits * inv_t
            if grad_h is not None:
                grad_h[s:s + chunk] = dlogits @ Wf
            if grad_W is not None:
                grad_W += dlogits.T @ hc
        return (
            None if grad_h is None else grad_h.to(h.dtype),
            None if grad_W is None else grad_W.to(W.dtype),
            None,
            None,
            None,
            None,
        )


def _inv_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return 1.0 / float(temperature)


def chunked_logprobs(
    h: Tensor, W: Tensor, y: Tensor, *, chunk: int = 1024, entropy: bool = False, temperature: float = 1.0
) -> Tuple[Tensor, Optional[Tensor]]:
    """log softmax(h @ W.T / temperature)[y] for flat positions ``h`` [N, H], ``y`` [N]; float32 [N].

    Differentiable in ``h`` and ``W`` (a tied embedding gets its gradient through ``W``).
    Returns (logp, entropy or None).
    """
    if h.dim() != 2 or y.shape != h.shape[:1]:
        raise ValueError(f"expected h [N, H] and y [N], got {list(h.shape)} and {list(y.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    logp, ent = _ChunkedLogProb.apply(h, W, y, int(chunk), bool(entropy), _inv_temperature(temperature))
    return logp, (ent if entropy else None)


def module_chunked_logprobs(
    h: Tensor, head: torch.nn.Module, y: Tensor, *, chunk: int = 1024, entropy: bool = False, temperature: float = 1.0
) -> Tuple[Tensor, Optional[Tensor]]:
    """Like ``chunked_logprobs`` but calling the output-projection module per chunk, under
    activation checkpointing (the backward recomputes the chunk's logits). For ZeRO 3, where the
    module's weight exists only while the module runs."""
    from torch.utils.checkpoint import checkpoint

    inv_t = _inv_temperature(temperature)

    def one(hc, yc):
        logits = head(hc).float() * inv_t
        return logits.gather(1, yc[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    out, ents = [], []
    for s in range(0, h.shape[0], chunk):
        out.append(checkpoint(one, h[s:s + chunk], y[s:s + chunk], use_reentrant=False))
        if entropy:
            with torch.no_grad():
                lg = head(h[s:s + chunk]).float() * inv_t
                p = torch.log_softmax(lg, -1)
                ents.append(-(p.exp() * p).sum(-1))
    empty = h.new_zeros(0, dtype=torch.float32)
    return (torch.cat(out) if out else empty), ((torch.cat(ents) if ents else empty) if entropy else None)


def naive_logprobs(h: Tensor, W: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """The reference: full float32 logits, log_softmax, gather (tests compare against it)."""
    return torch.log_softmax(h.float() @ W.float().T / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)


def token_kl(h: Tensor, W: Tensor, h_ref: Tensor, W_ref: Tensor, *, chunk: int = 1024, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary KL(pi(.|pos) || pi_ref(.|pos)) per position [N], gradient to ``h``/``W``
    (both policies at ``temperature``)."""
    inv_t = _inv_temperature(temperature)
    out = []
    for s in range(0, h.shape[0], chunk):
        lp = torch.log_softmax(h[s:s + chunk].float() @ W.float().T * inv_t, dim=-1)
        with torch.no_grad():
            lq = torch.log_softmax(h_ref[s:s + chunk].float() @ W_ref.float().T * inv_t, dim=-1)
        out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_kl_metric(h: Tensor, head: torch.nn.Module, h_ref: Tensor, head_ref: torch.nn.Module, *, chunk: int = 1024,
                    temperature: float = 1.0) -> Tensor:
    """Full-vocabulary KL(pi(.|pos) || pi_ref(.|pos)) per position [N], float32, no gradient: the
    KL the learner *reports*. Exact at every position whatever sampled the prefix, so it stays a
    KL (>= 0) off-policy, where the mean sampled log-ratio log pi(y)/pi_ref(y) does not (the tokens
    were drawn from another policy); rounding can take a position just below 0, which the
    learner's report clamps (as it does ``token_kl``'s). Calls the output modules (ZeRO 3 gathers
    the weight). Both policies at ``temperature``."""
    inv_t = _inv_temperature(temperature)
    out = []
    for s in range(0, h.shape[0], chunk):
        lp = torch.log_softmax(head(h[s:s + chunk]).float() * inv_t, dim=-1)
        lq = torch.log_softmax(head_ref(h_ref[s:s + chunk]).float() * inv_t, dim=-1)
        out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)
