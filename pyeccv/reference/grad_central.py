"""References for Gradient Centralization (Yong et al., ECCV 2020, arXiv 2004.01461).

Ports of the official optimizers (Yonghongwei/Gradient-Centralization), operation for operation,
with today's torch call signatures (`add_(x, alpha=a)` for the removed `add_(a, x)`):
  - first release (`GC_code/CIFAR100/algorithm`): SGD_GC / SGD_GCC, Adam_GC / Adam_GCC,
    AdamW_GC / AdamW_GCC. GC is applied to the gradient, in place on `p.grad` (as the original
    does), after L2 weight decay for SGD / Adam. Their AdamW scales the decay by the bias-corrected
    step size (p -= lr * sqrt(bc2) / bc1 * (wd * p + m / (sqrt(v) + eps))), unlike torch's AdamW.
  - later release (`algorithm-GC/algorithm/Adam.py`): Adam / AdamW with use_gc, gc_conv_only and
    gc_loc; gc_loc=False centralises the update direction m / denom instead of the gradient.
They loop over parameters in Python with several kernels per tensor: the benchmark baseline.
"""
from __future__ import annotations

import math

import torch
from torch.optim.optimizer import Optimizer


def centralized_gradient(x: torch.Tensor, use_gc: bool = True, gc_conv_only: bool = False) -> torch.Tensor:
    """x -= mean over every dim but the first, for conv weights (ndim > 3) or all (ndim > 1)."""
    if use_gc and x.dim() > (3 if gc_conv_only else 1):
        x.add_(-x.mean(dim=tuple(range(1, x.dim())), keepdim=True))
    return x


class _SGDGCBase(Optimizer):
    gc_conv_only = False

    def __init__(self, params, lr=0.1, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd, momentum, dampening, nesterov = (group["weight_decay"], group["momentum"], group["dampening"],
                                                 group["nesterov"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.data
                if wd != 0:
                    d_p.add_(p.data, alpha=wd)
                centralized_gradient(d_p, True, self.gc_conv_only)  # GC, in place on p.grad
                if momentum != 0:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        buf = st["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf = st["momentum_buffer"]
                        buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                    d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
                p.data.add_(d_p, alpha=-group["lr"])
        return loss


class SGD_GC(_SGDGCBase):  # noqa: N801 - the official names
    gc_conv_only = False


class SGD_GCC(_SGDGCBase):  # noqa: N801
    gc_conv_only = True


def _adam_state(st, p, amsgrad: bool):
    """The official state initialisation: step 0 and zero moments."""
    if len(st) == 0:
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p)
        st["exp_avg_sq"] = torch.zeros_like(p)
        if amsgrad:
            st["max_exp_avg_sq"] = torch.zeros_like(p)
    return st["exp_avg"], st["exp_avg_sq"]


class _AdamGCBase(Optimizer):
    gc_conv_only = False
    decoupled = False  # the official AdamW form

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                amsgrad = group["amsgrad"]
                st = self.state[p]
                exp_avg, exp_avg_sq = _adam_state(st, p.data, amsgrad)
                beta1, beta2 = group["betas"]
                st["step"] += 1
                bias_correction1 = 1 - beta1 ** st["step"]
                bias_correction2 = 1 - beta2 ** st["step"]
                if not self.decoupled and group["weight_decay"] != 0:
                    grad.add_(p.data, alpha=group["weight_decay"])
                centralized_gradient(grad, True, self.gc_conv_only)  # GC, in place on p.grad
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if amsgrad:
                    torch.max(st["max_exp_avg_sq"], exp_avg_sq, out=st["max_exp_avg_sq"])
                    v = st["max_exp_avg_sq"]
                else:
                    v = exp_avg_sq
                if self.decoupled:
                    denom = v.sqrt().add_(group["eps"])
                    step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
                    p.data.add_(torch.mul(p.data, group["weight_decay"]).addcdiv_(exp_avg, denom), alpha=-step_size)
                else:
                    denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                    p.data.addcdiv_(exp_avg, denom, value=-group["lr"] / bias_correction1)
        return loss


class Adam_GC(_AdamGCBase):  # noqa: N801
    gc_conv_only = False


class Adam_GCC(_AdamGCBase):  # noqa: N801
    gc_conv_only = True


class AdamW_GC(_AdamGCBase):  # noqa: N801
    gc_conv_only, decoupled = False, True


class AdamW_GCC(_AdamGCBase):  # noqa: N801
    gc_conv_only, decoupled = True, True


class AdamGCLoc(Optimizer):
    """The later official Adam / AdamW (algorithm-GC): use_gc, gc_conv_only, gc_loc.

    gc_loc=True centralises the gradient (after L2 decay for Adam); gc_loc=False centralises the
    update direction G = m / denom (for AdamW, G includes its decay term wd * p).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 use_gc=True, gc_conv_only=False, gc_loc=True, adamw=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))
        self.use_gc, self.gc_conv_only, self.gc_loc, self.adamw = use_gc, gc_conv_only, gc_loc, adamw

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state[p]
                exp_avg, exp_avg_sq = _adam_state(st, p, group["amsgrad"])
                beta1, beta2 = group["betas"]
                st["step"] += 1
                bias_correction1 = 1 - beta1 ** st["step"]
                bias_correction2 = 1 - beta2 ** st["step"]
                if not self.adamw and group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if self.gc_loc:
                    grad = centralized_gradient(grad, self.use_gc, self.gc_conv_only)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsgrad"]:
                    torch.max(st["max_exp_avg_sq"], exp_avg_sq, out=st["max_exp_avg_sq"])
                    v = st["max_exp_avg_sq"]
                else:
                    v = exp_avg_sq
                denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                step_size = group["lr"] / bias_correction1
                G = exp_avg / denom
                if self.adamw:
                    G = G.add(p, alpha=group["weight_decay"])
                if not self.gc_loc:
                    G = centralized_gradient(G, self.use_gc, self.gc_conv_only)
                p.add_(G, alpha=-step_size)
        return loss
