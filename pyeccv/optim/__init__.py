"""Gradient Centralization optimizers (Yong et al., ECCV 2020, arXiv 2004.01461).

pyeccv.optim.SGD / Adam / AdamW are torch.optim.SGD / Adam / AdamW (same constructor arguments,
defaults, validation, param groups, state_dict keys) plus

  gc_mode: "all" (default) centralises every parameter with more than one dimension (official
           `_GC`), "conv" only those with more than three (official `_GCC`), None is plain torch
           (the step is torch's own, bit for bit).
  gc_loc:  Adam / AdamW only. "grad" (default) centralises the gradient after L2 weight decay and
           before the moments (the paper's and the first official release's placement); "update"
           centralises the update direction m_hat / (sqrt(v_hat) + eps) (the later release).
  backend: "auto" (C++ on CPU, Triton on CUDA), "native", "triton", "reference" (torch ops).

With GC on, a step is one fused multi-tensor kernel call per (param group, device, dtype): the
row means and the update share one pass over the data. No host synchronisation inside step().
AdamW uses torch's decoupled decay p -= lr * wd * p; the official AdamW_GC instead scales the decay
by the bias-corrected step size (p -= lr sqrt(bc2) / bc1 (wd p + m / (sqrt(v) + eps))).
Parameters in bfloat16 / float16 keep float32 optimizer state when GC is on.
DTensor parameters (FSDP2 `fully_shard`, dim-0 shards) are updated shard by shard: each shard
holds whole rows, so GC stays local; a parameter sharded on another dim raises ValueError.
The official class names are aliases: SGD_GC, SGD_GCC, Adam_GC, Adam_GCC, AdamW_GC, AdamW_GCC.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..ops.grad_central import centralise, gc_adam_, gc_sgd_, state_dtype
from ._plan import Plan

GC_MODES = ("all", "conv", None)
GC_LOCS = ("grad", "update")
_BACKENDS = ("auto", "native", "triton", "reference")

__all__ = ["SGD", "Adam", "AdamW", "SGD_GC", "SGD_GCC", "Adam_GC", "Adam_GCC", "AdamW_GC", "AdamW_GCC",
           "GC_MODES", "GC_LOCS"]


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


_DTENSOR = []


def _dtensor_cls():
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor  # torch >= 2.5
        except ImportError:  # pragma: no cover - older torch
            try:
                from torch.distributed._tensor import DTensor
            except ImportError:
                DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _local(t):
    """A DTensor's local shard (a view: in-place updates land in the DTensor), else t."""
    D = _DTENSOR[0] if _DTENSOR else _dtensor_cls()
    return t.to_local() if D is not None and type(t) is D else t


def _check_sharding(p, index: int) -> None:
    """GC needs whole rows on each rank: only dim-0 sharding (or replication) is allowed."""
    D = _dtensor_cls()
    if D is None or not isinstance(p, D):
        return
    for pl in p.placements:
        dim = getattr(pl, "dim", None)
        if pl.is_shard() and dim not in (0, -p.dim()):
            raise ValueError(f"gc_mode: parameter {index} (shape {tuple(p.shape)}) is sharded on dim {dim}; "
                             "Gradient Centralization needs whole rows on each rank (shard on dim 0, as "
                             "FSDP2 does), or use gc_mode=None for it")


def _locals(members):
    """(local params, local grads) of a bucket."""
    D = _dtensor_cls()
    if D is None or not any(type(p) is D for _, p in members):
        return [p for _, p in members], [p.grad for _, p in members]
    return [_local(p) for _, p in members], [_local(p.grad) for _, p in members]


def _unhooked(fn):
    """torch wraps Optimizer subclasses' step with the hook runner; our step already ran the hooks."""
    return fn.__wrapped__ if getattr(fn, "hooked", False) else fn


class _GC:
    _torch_cls = torch.optim.Optimizer
    _default_gc_mode = "all"

    @classmethod
    def _resolve(cls, gc_mode, gc_loc="grad"):
        """The GC settings of a constructor call (the class default when gc_mode is not given)."""
        gc_mode = cls._default_gc_mode if gc_mode == "__default__" else gc_mode
        if gc_mode not in GC_MODES:
            raise ValueError(f"gc_mode must be one of {GC_MODES}, got {gc_mode!r}")
        if gc_loc not in GC_LOCS:
            raise ValueError(f"gc_loc must be one of {GC_LOCS}, got {gc_loc!r}")
        return gc_mode

    def _gc_init(self, backend, **settings) -> None:
        """Records the GC settings as defaults and in every param group (a group may override)."""
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        settings["backend"] = backend
        self.defaults.update(settings)
        for group in self.param_groups:
            for k, v in settings.items():
                group.setdefault(k, v)
            if group["gc_mode"] not in GC_MODES:
                raise ValueError(f"gc_mode must be one of {GC_MODES}, got {group['gc_mode']!r}")

    def _opt(self, group, key):
        return group.get(key, self.defaults.get(key))

    def _plan(self, group, bucket_key, plan_key, build):
        """The cached launch plan of a (group, device, dtype) bucket; rebuilt when its parameters,
        GC settings or state change."""
        plans = self.__dict__.setdefault("_gc_plans", {})
        key = (id(group),) + bucket_key
        plan = plans.get(key)
        if plan is None or plan.key != plan_key:
            plan = build()
            plan.key = plan_key
            plans[key] = plan
        return plan

    def load_state_dict(self, state_dict):
        self.__dict__["_gc_plans"] = {}  # the state tensors are replaced: their pointers change
        super().load_state_dict(state_dict)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gc_plans", None)
        state.pop("_gc_buckets", None)
        return state

    def _buckets(self, group):
        """(device, dtype) -> [(index in group, param)] for the params with gradients. The checks on
        each parameter run when the set of parameters with gradients changes, not every step."""
        with_grad = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
        cache = self.__dict__.setdefault("_gc_buckets", {})
        key = (id(group), tuple(id(p) for _, p in with_grad))
        hit = cache.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1]
        out = defaultdict(list)
        for i, p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise ValueError("gc_mode does not support complex parameters (use gc_mode=None)")
            lp = _local(p)
            out[(lp.device, lp.dtype)].append((i, p))
        out = dict(out)
        cache[id(group)] = (key, out)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plain = [g for g in self.param_groups if self._opt(g, "gc_mode") is None]
        if plain:  # plain torch semantics: torch's own step on those groups
            saved = self.param_groups
            self.param_groups = plain
            try:
                _unhooked(self._torch_cls.step)(self)
            finally:
                self.param_groups = saved
        for group in self.param_groups:
            if self._opt(group, "gc_mode") is not None:
                for flag in ("fused", "capturable", "differentiable"):
                    if group.get(flag):
                        raise ValueError(f"gc_mode={self._opt(group, 'gc_mode')!r} runs its own fused kernel: "
                                         f"{flag}=True is not supported with it")
                self._gc_group(group)
        return loss

    def _params_with_grads(self, group):
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise ValueError("gc_mode does not support complex parameters (use gc_mode=None)")
            yield i, p


def _state_buffer(st, key, p):
    """A zero state buffer of the parameter's shape, in the GC state dtype."""
    want = state_dtype(p)
    buf = st.get(key)
    if buf is None:
        buf = torch.zeros_like(p, dtype=want, memory_format=torch.preserve_format)
        st[key] = buf
    elif buf.dtype != want:  # e.g. state made by torch (gc_mode None) for a bf16 parameter
        buf = buf.to(want)
        st[key] = buf
    return buf


class SGD(_GC, torch.optim.SGD):
    """torch.optim.SGD with Gradient Centralization (after weight decay, before momentum)."""

    _torch_cls = torch.optim.SGD
    _default_gc_mode = "all"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 gc_mode="__default__", backend="auto", **kwargs):
        gc_mode = self._resolve(gc_mode)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)
        self._gc_init(backend, gc_mode=gc_mode)

    def _gc_group(self, group):
        mode, momentum = self._opt(group, "gc_mode"), float(group["momentum"])
        hyper = dict(lr=float(group["lr"]), momentum=momentum, dampening=float(group["dampening"]),
                     weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                     maximize=bool(group["maximize"]))
        backend = self._opt(group, "backend")
        for bkey, members in self._buckets(group).items():
            def build():
                ps, bufs, gcs, inits = [], [], [], []
                for i, p in members:
                    gc = centralise(p, mode)
                    if gc:
                        _check_sharding(p, i)
                    if momentum != 0:
                        st = self.state[p]
                        inits.append(st.get("momentum_buffer") is None)
                        if inits[-1]:
                            st["momentum_buffer"] = torch.empty_like(p, dtype=state_dtype(p),
                                                                     memory_format=torch.preserve_format)
                        bufs.append(_local(_state_buffer(st, "momentum_buffer", p)))
                    else:
                        inits.append(False)
                    ps.append(_local(p))
                    gcs.append(gc)
                return Plan(ps, [bufs], gcs, init=inits)

            plan = self._plan(group, bkey, (id(members), mode, momentum != 0), build)
            params, grads = _locals(members)
            if plan.refresh(params, grads):
                plan.run("sgd", backend, **dict(hyper, momentum=momentum if plan.bufs[0] else 0.0))
            else:  # strided tensors: the op's general path (dense copies)
                gc_sgd_(params, grads, plan.bufs[0], [bool(x) for x in plan.tab[:, 7]],
                        [bool(x) for x in plan.tab[:, 8]], *hyper.values(), backend)
                plan.tab[:, 8] = 0


class Adam(_GC, torch.optim.Adam):
    """torch.optim.Adam with Gradient Centralization of the gradient or of the update."""

    _torch_cls = torch.optim.Adam
    _default_gc_mode = "all"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 gc_mode="__default__", gc_loc="grad", backend="auto", **kwargs):
        gc_mode = self._resolve(gc_mode, gc_loc)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
        self._gc_init(backend, gc_mode=gc_mode, gc_loc=gc_loc)

    def _decoupled(self, group) -> bool:
        return isinstance(self, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))

    def _gc_group(self, group):
        mode, loc = self._opt(group, "gc_mode"), self._opt(group, "gc_loc")
        amsgrad = bool(group["amsgrad"])
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = float(group["lr"])
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                     amsgrad=amsgrad, maximize=bool(group["maximize"]), decoupled=self._decoupled(group),
                     gc_update=loc == "update")
        backend = self._opt(group, "backend")
        for bkey, members in self._buckets(group).items():
            def build():
                ps, ms, vs, xs, gcs, steps = [], [], [], [], [], []
                for i, p in members:
                    gc = centralise(p, mode)
                    if gc:
                        _check_sharding(p, i)
                    st = self.state[p]
                    if "step" not in st:
                        st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    steps.append(st)
                    ms.append(_local(_state_buffer(st, "exp_avg", p)))
                    vs.append(_local(_state_buffer(st, "exp_avg_sq", p)))
                    if amsgrad:
                        xs.append(_local(_state_buffer(st, "max_exp_avg_sq", p)))
                    ps.append(_local(p))
                    gcs.append(gc)
                return Plan(ps, [ms, vs, xs], gcs, steps=steps)

            plan = self._plan(group, bkey, (id(members), mode, loc, amsgrad), build)
            plan.increment_steps()
            plan.adam_scalars(lr, beta1, beta2)
            params, grads = _locals(members)
            if plan.refresh(params, grads):
                plan.run("adam", backend, **hyper)
            else:  # strided tensors: the op's general path (dense copies)
                gc_adam_(params, grads, plan.bufs[0], plan.bufs[1], plan.bufs[2], [bool(x) for x in plan.tab[:, 7]],
                         [float(x) for x in plan.scal[:, 0]], [float(x) for x in plan.scal[:, 1]], *hyper.values(),
                         backend)


class AdamW(Adam, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled decay p -= lr wd p) with Gradient Centralization."""

    _torch_cls = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 gc_mode="__default__", gc_loc="grad", backend="auto", **kwargs):
        gc_mode = self._resolve(gc_mode, gc_loc)
        torch.optim.AdamW.__init__(self, params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   amsgrad=amsgrad, **kwargs)
        self._gc_init(backend, gc_mode=gc_mode, gc_loc=gc_loc)


# The official class names (Yonghongwei/Gradient-Centralization): _GC = every parameter with
# more than one dimension, _GCC = conv weights only. Note: AdamW_* use torch's decoupled decay.
def _alias(base, name: str, mode: str):
    return type(name, (base,), {"_default_gc_mode": mode, "__doc__": f"{base.__name__} with gc_mode={mode!r} "
                                                                     f"by default (the official {name})."})


SGD_GC = _alias(SGD, "SGD_GC", "all")
SGD_GCC = _alias(SGD, "SGD_GCC", "conv")
Adam_GC = _alias(Adam, "Adam_GC", "all")
Adam_GCC = _alias(Adam, "Adam_GCC", "conv")
AdamW_GC = _alias(AdamW, "AdamW_GC", "all")
AdamW_GCC = _alias(AdamW, "AdamW_GCC", "conv")
