"""Train a small CNN on synthetic data with and without Gradient Centralization (pyeccv.optim).

Prints both loss curves (and saves a plot to gc_training.png when matplotlib is installed).
    python examples/gc_training.py --steps 150 --optimizer adam
"""
import argparse
import time

import torch
from torch import nn

import pyeccv.optim as O


def data(n: int, classes: int, g: torch.Generator):
    """Images whose class is a colour-weighted pattern, plus noise: learnable, not trivial."""
    protos = torch.randn(classes, 3, 16, 16, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = protos[labels] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)
    return x, labels


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, classes))


def train(gc_mode, args, x, y):
    torch.manual_seed(args.seed)
    model = cnn(args.classes)
    if args.optimizer == "adam":
        opt = O.Adam(model.parameters(), lr=args.lr, weight_decay=5e-4, gc_mode=gc_mode)
    else:
        opt = O.SGD(model.parameters(), lr=args.lr * 50, momentum=0.9, weight_decay=5e-4, gc_mode=gc_mode)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="gc_training.png")
    args = p.parse_args(argv)
    x, y = data(2048, args.classes, torch.Generator().manual_seed(123))
    t0 = time.perf_counter()
    curves = {"without GC": train(None, args, x, y), "with GC": train("all", args, x, y)}
    print(f"{args.optimizer}, {args.steps} steps ({time.perf_counter() - t0:.1f} s); loss averaged over windows:")
    w = max(1, args.steps // 10)
    print("step      " + "".join(f"{name:>14s}" for name in curves))
    for s in range(0, args.steps, w):
        print(f"{s:4d}-{s + w - 1:<4d} " + "".join(f"{sum(c[s:s + w]) / len(c[s:s + w]):14.4f}"
                                                   for c in curves.values()))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, c in curves.items():
            plt.plot(c, label=name)
        plt.xlabel("step")
        plt.ylabel("training loss")
        plt.legend()
        plt.savefig(args.plot, dpi=100)
        print(f"plot saved to {args.plot}")
    except ImportError:
        pass
    return curves


if __name__ == "__main__":
    main()
