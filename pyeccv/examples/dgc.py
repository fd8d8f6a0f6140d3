"""Train a narrow DGC-ResNet-18 on synthetic CIFAR-sized images, then time its inference three ways.

The data are 32x32 RGB images of 10 classes made of three cues: an oriented grating (5 orientations,
36 degrees apart, jittered; random period, phase and colour), an occluding shape (a disk or a plus
sign; random place, size and colour) and a weak colour cast (a tint per class, blurred by a random
per-image cast), plus Gaussian noise; class = orientation + 5 * shape. The train and held-out sets
are drawn once from the seed (no download, no augmentation).

Training follows the official recipe (hellozhuo/dgc main.py): SGD with Nesterov momentum 0.9,
weight decay 1e-4, lr 0.1 with a per-step cosine decay, the model called as model(x, progress) with
progress = fraction of training done (the layers prune progressively: none up to 1/12, a linear
ramp to gate_factor * C_in kept channels per head at 3/4, held after), and the loss
cross_entropy + 1e-5 * sum of the layers' group-lasso terms.

Then, on one batch of held-out images in eval mode, it times (median of several runs, round-robin):
  pyeccv           the trained model: pyeccv.nn.DynamicGroupConv2d -> pyeccv.dyn_group_conv2d
                   (backend "auto": only the kept channels are convolved);
  official-masked  the same weights in the official classes (pyeccv.reference.dyn_group_conv: one
                   masked copy of the input per head, dense grouped conv);
  dense            a plain ResNet-18 of the same width (no gating, every channel).

Held-out accuracy is measured in eval mode (BN running statistics), as the official validate() does,
after recomputing those statistics at the final weights (DGCResNet.recalibrate_bn over --recalibrate
training images; "precise BN"). The official DGC-ResNet is fragile in eval mode: a DGC layer
multiplies its input by a saliency computed from that same input, so a scale error of the running
statistics grows about quadratically from layer to layer (even at initialisation, with exact
statistics, the official dyresnet18's eval-mode logits can reach 1e14 where the train-mode ones are
~5). The running averages left by training lag the weights; a few held-out images then overflow to
inf / NaN; they count as wrong (pyeccv.dyn_group_conv2d refuses the NaN saliency that the official
code would carry on with). The accuracy with the training-time statistics and with per-batch BN
statistics are printed as diagnostics. Measured on the 2-core CPU with the defaults (one thread, the
other core busy): DGC 0.605 held-out accuracy after recalibration (14 of 1000 images overflowed),
0.478 with the training-time statistics (20 overflowed), 0.611 with per-batch statistics, after 316
steps in about 5 minutes; the plain ResNet-18 of the same width, same recipe (--train-dense): 0.88.
So short a schedule is hard on DGC: its pruning ramps over 2/3 of the run.

    python -m pyeccv.examples.dgc                 # width 16, 5000 + 1000 images, 4 epochs: a few CPU minutes
    python -m pyeccv.examples.dgc --train-dense   # also train the dense ResNet-18 (1-2 minutes more)
    python -m pyeccv.examples.dgc --quick         # a smoke-test size (seconds)

The model is pyeccv.models.dgc_resnet18(stem="cifar", width=--width) (the official network has a
base width of 64).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.dgc_resnet import DGCResNet, dgc_resnet18
from ..nn.dgc import DynamicGroupConv2d
from ..reference import dyn_group_conv as ref
from .nerf import Progress, _auto_threads

NUM_CLASSES = 10
LASSO_LAMBDA = 1e-5  # official --group-lasso-lambda


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_images(n: int, seed: int, size: int = 32) -> Tuple[Tensor, Tensor]:
    """n images (n, 3, size, size) float32 and their labels (n,) int64 (balanced), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    orient, shape = y % 5, y // 5
    theta = orient.float() * (math.pi / 5) + (rand(n) - 0.5) * (math.pi / 10)
    freq = 2 * math.pi / (4.0 + 4.0 * rand(n))  # period 4..8 pixels
    phase = 2 * math.pi * rand(n)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    u = xx[None] * theta.cos()[:, None, None] + yy[None] * theta.sin()[:, None, None]
    grating = torch.sin(freq[:, None, None] * u + phase[:, None, None])
    cx, cy = (size * (0.25 + 0.5 * rand(n)) for _ in range(2))
    r = size * (0.15 + 0.1 * rand(n))
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    disk = dx * dx + dy * dy <= rr * rr
    ax, ay = dx.abs(), dy.abs()
    cross = (torch.maximum(ax, ay) <= rr) & (torch.minimum(ax, ay) <= 0.3 * rr)  # a plus sign
    mask = torch.where((shape == 0)[:, None, None], disk, cross).to(torch.float32)[:, None]
    tex_colour = (0.3 + 0.7 * rand(n, 3)) * torch.where(rand(n, 3) < 0.5, -1.0, 1.0)
    shape_colour = (0.5 + 0.5 * rand(n, 3)) * torch.where(rand(n, 3) < 0.5, -1.0, 1.0)
    img = (1 - mask) * tex_colour[:, :, None, None] * grating[:, None] + mask * shape_colour[:, :, None, None]
    # a weak class colour cast (each class its own tint, blurred by a random per-image cast)
    palette = torch.randn(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(12345))
    cast = 0.3 * palette[y] + 0.3 * torch.randn(n, 3, generator=g)
    img = img + cast[:, :, None, None] + 0.5 * torch.randn(img.shape, generator=g)
    return img.contiguous(), y


# --------------------------------------------------------------------------------------------
# models: the DGC-ResNet-18 (ours and the official classes) and a dense ResNet-18, at any width
# --------------------------------------------------------------------------------------------
def _build_resnet18(net: nn.Module, width: int, num_classes: int) -> None:
    """The ResNet-18 body with the CIFAR stem (3x3/1 conv, no max pool) and base width `width`
    on `net`, whose class provides _make_layer(planes, blocks, stride) and net._cfg; the official
    initialisation (every conv kaiming fan_out, BN weight 1 and bias 0)."""
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.Identity()
    net.layer1 = net._make_layer(width, 2)
    net.layer2 = net._make_layer(2 * width, 2, stride=2)
    net.layer3 = net._make_layer(4 * width, 2, stride=2)
    net.layer4 = net._make_layer(8 * width, 2, stride=2)
    net.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    net.fc = nn.Linear(8 * width, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class NarrowOfficialDyResNet18(ref.DyResNet):
    """The official dyresnet18 (reference classes: masked computation) with the CIFAR stem and base
    width `width`; loads the state_dict of dgc_resnet18(stem="cifar", width=width)."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES, heads: int = 4, squeeze_rate: int = 16,
                 gate_factor: float = 0.25):
        nn.Module.__init__(self)
        self._cfg = (heads, squeeze_rate, gate_factor)
        _build_resnet18(self, width, num_classes)


class _DenseBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class DenseResNet18(nn.Module):
    """A plain ResNet-18 (CIFAR stem, base width `width`): the dense network DGC accelerates."""

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._cfg = None
        _build_resnet18(self, width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [_DenseBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [_DenseBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def pruning_report(model: nn.Module, x: Tensor) -> Dict[int, Dict[str, float]]:
    """Per input width C_in of the DGC layers: channels kept per head (keep = C_in - inactive), the
    mean channels a head really uses on `x` (the official tie rule drops saliencies equal to the
    threshold, e.g. several zeros), and the conv MACs per image: kept vs all channels."""
    stats: Dict[int, Dict[str, float]] = {}
    hooks = []

    def layer_hook(layer: DynamicGroupConv2d):
        def hook(mod, inp, out):
            out = out[0] if isinstance(out, tuple) else out
            pos = out.shape[2] * out.shape[3] * layer.kernel_size[0] * layer.kernel_size[1]
            s = stats.setdefault(layer.in_channels, dict(keep=layer.keep, used=[], mmacs_kept=0.0, mmacs_dense=0.0))
            s["mmacs_kept"] += layer.out_channels * max(layer.keep, 0) * pos / 1e6
            s["mmacs_dense"] += layer.out_channels * layer.in_channels * pos / 1e6
            sal = layer.saliency(layer.relu(layer.norm(inp[0])))  # (B, heads, C_in)
            C, keep = layer.in_channels, layer.keep
            if keep >= C:
                used = torch.full(sal.shape[:2], float(C))
            else:
                thr = sal.sort(dim=2, descending=True).values[:, :, keep:keep + 1]
                used = (sal > thr).sum(2).float()
            s["used"].append(used.mean().item())
        return hook

    for m in model.modules():
        if isinstance(m, DynamicGroupConv2d):
            hooks.append(m.register_forward_hook(layer_hook(m)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {C: dict(keep=s["keep"], used=statistics.fmean(s["used"]), mmacs_kept=s["mmacs_kept"],
                    mmacs_dense=s["mmacs_dense"]) for C, s in sorted(stats.items())}


def time_models(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """Median ms per call of each function, after one warm-up each, run round-robin so that a
    load change on the machine hits all of them alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 250, batch_stats: bool = False
             ) -> Tuple[float, Tensor]:
    """Held-out accuracy in eval mode and the (n,) mask of the images whose logits are finite.

    An image whose eval-mode activations overflow counts as wrong. In a DGC layer the input is
    multiplied by a saliency computed from that same input, so a scale error of the BN running
    statistics on an image grows about quadratically from layer to layer; on a few atypical images
    (and on many, early in training) the official model's eval-mode activations reach inf / NaN, and
    pyeccv.dyn_group_conv2d refuses a NaN saliency (ValueError) where the official code returns NaN.
    A batch that fails is split in halves until the failing images are isolated.
    batch_stats=True normalises each batch with its own BN statistics instead of the running ones
    (train-mode BN, nothing updated): a diagnostic of the train / eval gap, not inference."""
    was = model.training
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] if batch_stats else []
    saved = [m.momentum for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0  # running statistics left as they are
    finite = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    right = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def run(lo: int, hi: int) -> None:
        try:
            logits = model(x[lo:hi])
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            ok = logits.isfinite().all(1)
        except ValueError as e:
            if "saliency" not in str(e):
                raise
            ok = None
        if ok is None:  # eval mode treats images independently: split to find the failing ones
            if hi - lo > 1 and not batch_stats:
                mid = (lo + hi) // 2
                run(lo, mid)
                run(mid, hi)
            return
        finite[lo:hi] = ok
        right[lo:hi] = ok & (logits.argmax(1) == y[lo:hi])

    try:
        for s in range(0, x.shape[0], batch):
            run(s, min(x.shape[0], s + batch))
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return float(right.float().mean()) if x.shape[0] else 0.0, finite


def train(model: nn.Module, x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, args, name: str):
    """The official recipe (see the module docstring); a DGC model is called as model(x, progress) and
    its lasso terms join the loss, a dense one is called as model(x). Returns the per-epoch history,
    the steps taken and the seconds spent."""
    is_dgc = isinstance(model, DGCResNet)
    dgc_layers = [m for m in model.modules() if isinstance(m, DynamicGroupConv2d)]
    channels = [m.in_channels for m in dgc_layers]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    per_epoch = math.ceil(args.train / args.batch)
    total = args.epochs * per_epoch
    bar = Progress(total)
    t_train = time.perf_counter()
    step, progress, history = 0, 0.0, []
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(args.train, generator=gen).to(x_tr.device)
        seen, correct, loss_sum = 0, 0, 0.0
        for i in range(per_epoch):
            # official: progress = fraction of steps done (here also of the time budget, if further)
            progress = min(1.0, max(step / total, (time.perf_counter() - t_train) / args.time_budget))
            for group in opt.param_groups:  # official cosine, per step
                group["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * progress))
            idx = order[i * args.batch:(i + 1) * args.batch]
            if is_dgc:
                logits, lasso = model(x_tr[idx], progress)
                ce = F.cross_entropy(logits, y_tr[idx])
                loss = ce + LASSO_LAMBDA * torch.stack([term.mean() for term in lasso]).sum()
            else:
                logits = model(x_tr[idx])
                loss = ce = F.cross_entropy(logits, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += idx.numel()
            correct += int((logits.detach().argmax(1) == y_tr[idx]).sum())
            loss_sum += float(ce.detach()) * idx.numel()
            bar.update(step, f"{name} epoch {epoch + 1} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
            if progress >= 1.0:
                break
        held, fin = evaluate(model, x_te, y_te)
        history.append(dict(epoch=epoch + 1, loss=loss_sum / seen, train_acc=correct / seen, test_acc=held,
                            overflow=int((~fin).sum()), progress=progress, keep=[m.keep for m in dgc_layers]))
        bar.update(step, f"{name} epoch {epoch + 1} loss {loss_sum / seen:.3f} acc {correct / seen:.3f} held-out "
                   f"{held:.3f}", force=True)
        if progress >= 1.0 and step < total:
            bar.close()
            print(f"time budget of {args.time_budget:.0f} s reached after {step}/{total} steps: stopped at the final "
                  "pruning level")
            break
    bar.close()
    seconds = time.perf_counter() - t_train
    for h in history:
        kept = ", ".join(f"{k}/{c}" for c, k in sorted(set(zip(channels, h["keep"]))))
        print(f"  epoch {h['epoch']}: loss {h['loss']:.3f}, train acc {h['train_acc']:.3f}, held-out acc "
              f"{h['test_acc']:.3f}" + (f" ({h['overflow']} overflowed), progress {h['progress']:.2f}, channels "
                                        f"kept per head {kept}" if is_dgc else ""))
    print(f"  {step} steps in {seconds:.1f} s")
    return history, step, seconds


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
QUICK = dict(epochs=1, width=8, train=512, test=256, batch=32, time_batch=16, time_reps=3, recalibrate=128)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m pyeccv.examples.dgc", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 4; --quick 1)")
    p.add_argument("--width", type=int, default=None, help="base width, a multiple of --heads (default 16; the "
                   "official ResNet-18 has 64; --quick 8)")
    p.add_argument("--train", type=int, default=None, help="training images (default 5000; --quick 512)")
    p.add_argument("--test", type=int, default=None, help="held-out images (default 1000; --quick 256)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64, the official CIFAR batch)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (official 0.1, cosine decay)")
    p.add_argument("--gate", type=float, default=0.25, help="gate factor: fraction of input channels kept per head")
    p.add_argument("--heads", type=int, default=4, help="heads per DGC layer")
    p.add_argument("--time-batch", type=int, default=None, help="images per timed inference call (default 64)")
    p.add_argument("--time-reps", type=int, default=None, help="timed runs per model (median; default 7)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores, at least 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds of training: progress (pruning schedule and lr) then follows the clock where it is "
                        "ahead of the steps, so training ends at the final pruning level within about that time "
                        "(default: none; a compressed schedule trains DGC worse)")
    p.add_argument("--train-dense", action="store_true",
                   help="also train the dense ResNet-18 (same recipe, no lasso) and report its held-out accuracy")
    p.add_argument("--recalibrate", type=int, default=None,
                   help="training images over which the BN running statistics are recomputed after training "
                        "(DGCResNet.recalibrate_bn; default 2000, --quick 128; 0: keep the training-time ones)")
    p.add_argument("--quick", action="store_true", help=f"tiny run for a smoke test: {QUICK}")
    args = p.parse_args(argv)

    defaults = dict(epochs=4, width=16, train=5000, test=1000, batch=64, time_batch=64, time_reps=7, recalibrate=2000)
    for k, v in (QUICK if args.quick else defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.width < 1 or args.width % args.heads:
        p.error(f"--width must be a positive multiple of --heads = {args.heads}, got {args.width}")
    if not 0.0 < args.gate <= 1.0:
        p.error(f"--gate must be in (0, 1], got {args.gate}")
    for name in ("epochs", "train", "test", "batch", "time_batch", "time_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.recalibrate < 0:
        p.error(f"--recalibrate must be >= 0, got {args.recalibrate}")
    if not args.time_budget > 0:
        p.error(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads if args.threads > 0 else _auto_threads())
    saved_progress = ref.DynamicMultiHeadConv.global_progress
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)
        ref.DynamicMultiHeadConv.global_progress = saved_progress


def _run(args, device: torch.device) -> Dict[str, object]:
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    x, y = make_images(args.train + args.test, args.seed)
    mean, std = x[:args.train].mean((0, 2, 3), keepdim=True), x[:args.train].std((0, 2, 3), keepdim=True)
    x = ((x - mean) / std).to(device)
    y = y.to(device)
    x_tr, y_tr, x_te, y_te = x[:args.train], y[:args.train], x[args.train:], y[args.train:]
    cfg = dict(width=args.width, heads=args.heads, gate_factor=args.gate)
    model = dgc_resnet18(NUM_CLASSES, stem="cifar", **cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"data: {args.train} training + {args.test} held-out 32x32 images, {NUM_CLASSES} classes "
          f"({time.perf_counter() - t_start:.1f} s); device {device}"
          f"{f', threads={torch.get_num_threads()}' if device.type == 'cpu' else ''}")
    print(f"model: DGC-ResNet-18, base width {args.width}, {args.heads} heads, gate {args.gate}, "
          f"{n_params / 1e6:.2f} M parameters; {args.epochs} epochs of batch {args.batch}")

    history, step, train_s = train(model, x_tr, y_tr, x_te, y_te, args, "DGC")
    dense = DenseResNet18(args.width).to(device)
    dense_acc = None
    if args.train_dense:
        print(f"the dense ResNet-18 of width {args.width}, same recipe (no lasso, no pruning):")
        dense_hist, _, _ = train(dense, x_tr, y_tr, x_te, y_te, args, "dense")
        dense_acc = dense_hist[-1]["test_acc"]
    dense.eval()

    model.eval()
    acc_running, finite_running = evaluate(model, x_te, y_te)
    acc_bs, _ = evaluate(model, x_te, y_te, batch_stats=True)
    recal = 0
    if args.recalibrate > 0:  # precise BN: running statistics recomputed at the final weights
        pick = torch.randperm(args.train, generator=torch.Generator().manual_seed(args.seed + 2))
        pick = pick[:args.recalibrate].to(x_tr.device)
        recal = model.recalibrate_bn(x_tr[pick[i:i + args.batch]] for i in range(0, pick.numel(), args.batch))
        acc, finite = evaluate(model, x_te, y_te)
    else:
        acc, finite = acc_running, finite_running
    overflow = int((~finite).sum())
    # the timed batch: held-out images with finite eval-mode activations (see evaluate())
    pool = x_te[finite]
    if pool.shape[0] == 0:
        raise SystemExit("every held-out image overflows in eval mode (see evaluate()): train longer or with a "
                         "lower --lr")
    xb = pool[:args.time_batch]
    if xb.shape[0] < args.time_batch:  # fewer such images than the timed batch: repeat them
        xb = xb.repeat(math.ceil(args.time_batch / xb.shape[0]), 1, 1, 1)[:args.time_batch]
    prune = pruning_report(model, xb)

    official = NarrowOfficialDyResNet18(**cfg).to(device)
    official.load_state_dict(model.state_dict())
    official.eval()
    with torch.no_grad():  # float64 norms: eval-mode logits can be huge (see evaluate())
        ours_logits = model(xb)[0].double()
        off_logits = official(xb)[0].double()
    agree = float((ours_logits - off_logits).norm() / off_logits.norm().clamp_min(1e-30))
    same_pred = float((ours_logits.argmax(1) == off_logits.argmax(1)).float().mean())
    fns = {"pyeccv": lambda: model(xb), "official-masked": lambda: official(xb), "dense": lambda: dense(xb)}
    if device.type == "cuda":
        def synced(fn):
            def run():
                fn()
                torch.cuda.synchronize()
            return run
        fns = {k: synced(fn) for k, fn in fns.items()}
    times = time_models(fns, args.time_reps)

    mm_kept = sum(s["mmacs_kept"] for s in prune.values())
    mm_dense = sum(s["mmacs_dense"] for s in prune.values())
    print(f"\nDGC held-out accuracy {acc:.3f} ({args.test} images, chance 0.1; eval mode"
          + (f", BN statistics recalibrated over {recal} training images" if recal else "")
          + f", {overflow} images whose activations overflowed counted wrong)"
          + ("" if dense_acc is None else f"; the dense ResNet-18: {dense_acc:.3f}"))
    print(f"  diagnostics: with the training-time running statistics {acc_running:.3f} "
          f"({int((~finite_running).sum())} overflowed); with per-batch BN statistics {acc_bs:.3f}")
    print("final pruning level (channels per head; 'used': mean over held-out images and heads, after the "
          "official tie rule):")
    print("  C_in  keep/head  used   conv MMACs/img kept / dense")
    for C, s in prune.items():
        print(f"  {C:4d}  {s['keep']:9d}  {s['used']:5.2f}  {s['mmacs_kept']:8.2f} / {s['mmacs_dense']:.2f}")
    print(f"  DGC layers: {mm_kept:.2f} MMACs/img on kept channels vs {mm_dense:.2f} dense "
          f"({mm_kept / mm_dense:.2f}x); the official masked path computes the dense amount")
    print(f"pyeccv vs official-masked logits: relative error {agree:.1e}, same prediction on {same_pred:.3f}")
    print(f"\ninference, batch {xb.shape[0]}, eval mode, median of {args.time_reps} runs "
          f"({device}{f', {torch.get_num_threads()} threads' if device.type == 'cpu' else ''}):")
    print("  model                                              ms    vs official-masked  vs dense")
    labels = {"pyeccv": "DGC-ResNet-18, pyeccv gather path (ours)",
              "official-masked": "DGC-ResNet-18, official masked path",
              "dense": f"dense ResNet-18, width {args.width}" + ("" if args.train_dense else " (untrained)")}
    for k, ms in times.items():
        print(f"  {labels[k]:<47s} {ms:8.2f}  {times['official-masked'] / ms:17.2f}x  {times['dense'] / ms:7.2f}x")
    total_s = time.perf_counter() - t_start
    print(f"total {total_s:.1f} s")
    return {"accuracy": acc, "overflowed": overflow, "accuracy_batch_stats": acc_bs, "dense_accuracy": dense_acc,
            "accuracy_running_stats": acc_running, "recalibrated_on": recal,
            "history": history,
            "steps": step, "train_seconds": train_s, "seconds": total_s,
            "keep": {C: s["keep"] for C, s in prune.items()}, "used": {C: s["used"] for C, s in prune.items()},
            "mmacs_per_image": {"kept": mm_kept, "dense": mm_dense}, "times_ms": times,
            "logits_rel_err": agree, "same_prediction": same_pred, "time_batch": xb.shape[0],
            "threads": torch.get_num_threads(), "device": str(device),
            "config": dict(cfg, epochs=args.epochs, train=args.train, test=args.test, batch=args.batch, lr=args.lr)}


if __name__ == "__main__":
    main()
