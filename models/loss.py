"""The LM head and its cross-entropy, fused and chunked: the full (N, V) logits never exist.

``F.cross_entropy(F.linear(x, W).float(), t)`` keeps, per micro-batch of N tokens and a vocabulary of V,
the (N, V) logits, their fp32 copy, the saved log-softmax and, in backward, two more (N, V) fp32 buffers:
for GPT-2's V = 50,257 that is 200 kB per token per buffer, a third of a small model's step on a CPU and
most of its memory growth. ``fused_lm_loss`` takes the tokens ``chunk`` at a time and computes, in
forward, each chunk's loss *and* its gradients (the softmax minus the one-hot target, scaled by 1/N, times
W for the input and times x for the weight), so only one (chunk, V) block is ever alive; backward only
scales the stored gradients by the incoming one (the design of Liger-Kernel's fused linear cross-entropy,
here in plain PyTorch). The matmuls are the plain path's -- 2NVd forward, 4NVd backward -- so the FLOP
accounting is unchanged; nothing is recomputed.

Numerics: logits in the compute dtype (the autocast dtype when autocast is on, else x's), softmax and loss
in fp32, the weight gradient accumulated in fp32, as the plain path's fp32 cross-entropy does; equal to
the plain path within 1e-5 in fp32 (tests/test_models.py). ``ignore_index`` targets are left out of the
mean, as in ``F.cross_entropy``.

Memory kept from forward to backward: the input's gradient (N, d) in x's dtype and the weight's gradient
(V, d) in fp32 (it would exist in backward anyway); transient: one chunk's logits and probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        dtype = _compute_dtype(x)
        n = x.shape[0]
        valid = (targets != IGNORE_INDEX)
        count = valid.sum().clamp(min=1).to(torch.float32)
        w = weight.to(dtype)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        # one (chunk, V) fp32 block, reused by every chunk: allocated (and, on a CPU, page-faulted) once
        block = torch.empty(min(chunk, n), weight.shape[0], dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, n, chunk):
                xc = x[start:start + chunk].to(dtype)
                tc, vc = targets[start:start + chunk], valid[start:start + chunk]
                logits = block[:xc.shape[0]]  # (c, V)
                if dtype == torch.float32:
                    torch.mm(xc, w.t(), out=logits)
                else:
                    logits.copy_(xc @ w.t())
                safe_t = torch.where(vc, tc, 0)
                target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
                # log-sum-exp and softmax in place in the block (torch.logsumexp would allocate a second
                # (c, V) buffer): shift by the row max, exponentiate, sum, normalise
                row_max = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(row_max).exp_()
                sum_exp = probs.sum(dim=-1)
                lse = row_max.squeeze(1) + sum_exp.log()
                total += ((lse - target_logit) * vc).sum()
                if need_x or need_w:
                    # d(loss)/d(logits) = (softmax - onehot(target)) * scale, scale = 1/count (0: ignored); the
                    # scale is applied to the (c, d) sides of the matmuls, not to the (c, V) block
                    g = probs.div_(sum_exp[:, None])
                    g.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
                    scale = (vc.to(torch.float32) / count)[:, None]
                    gd = g.to(dtype)
                    if need_x:
                        grad_x[start:start + chunk] = ((gd @ w).float() * scale).to(x.dtype)
                    if need_w and dtype == torch.float32:  # addmm with out= (FlopCounterMode counts it; addmm_ not)
                        torch.addmm(grad_w, g.t(), xc * scale, out=grad_w)
                    elif need_w:  # a 16-bit matmul as the plain path's backward does, accumulated in fp32
                        grad_w += (gd.t() @ (xc.float() * scale).to(dtype)).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gx, gw, None, None


def fused_lm_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of ``x @ weight.T`` against ``targets``, ``chunk`` tokens at a time.
    ``x``: (..., d) head input, ``weight``: (V, d), ``targets``: (...) token ids."""
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(x2, weight, t, chunk)
    with torch.no_grad():  # evaluation: the loss alone, still chunk by chunk
        dtype = _compute_dtype(x2)
        total = torch.zeros((), dtype=torch.float32, device=x2.device)
        for start in range(0, x2.shape[0], chunk):
            logits = F.linear(x2[start:start + chunk].to(dtype), weight.to(dtype)).float()
            total += F.cross_entropy(logits, t[start:start + chunk], reduction="sum", ignore_index=IGNORE_INDEX)
        return total / (t != IGNORE_INDEX).sum().clamp(min=1)
