"""Train pyeccv.models.NeRF on an analytic scene and report held-out PSNR.

The scene is a few coloured, partly transparent primitives (spheres and boxes of constant density
and colour) near the origin. Ground-truth images come from exact compositing: along a ray the
density is piecewise constant between the primitives' entry and exit depths, so each segment has
alpha = 1 - exp(-sigma len) and the density-weighted mean colour of the primitives covering it, no
quadrature and no download. Cameras sit on a sphere looking at the origin; training draws random
rays from the training views; PSNR is measured on held-out views and one of them is written next
to its ground truth as a PNG (left: NeRF, right: ground truth).

    python -m pyeccv.examples.nerf                 # tiny config, CPU in a few minutes, >= 25 dB
    python -m pyeccv.examples.nerf --paper --device cuda   # 8 x 256 MLPs, 64 + 128 samples
"""
from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import time
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..models.nerf import NeRF

# --------------------------------------------------------------------------------------------
# the analytic scene
# --------------------------------------------------------------------------------------------
# (kind, centre, size, sigma, rgb): spheres take a radius, boxes their half extents.
PRIMITIVES = (
    ("sphere", (0.30, 0.15, 0.00), 0.40, 10.0, (0.90, 0.15, 0.10)),
    ("box", (-0.35, -0.20, 0.05), (0.25, 0.25, 0.30), 6.0, (0.10, 0.75, 0.20)),
    ("sphere", (-0.05, 0.05, 0.45), 0.30, 2.5, (0.15, 0.30, 0.95)),
    ("box", (0.10, 0.20, -0.50), (0.45, 0.35, 0.08), 4.0, (0.95, 0.80, 0.15)),
)


class Scene:
    """Constant-density primitives; `render` composites rays exactly, `query` gives the density
    and colour at points (for brute-force checks)."""

    def __init__(self, primitives: Sequence[tuple] = PRIMITIVES, dtype: torch.dtype = torch.float64):
        self.primitives = tuple(primitives)
        self.dtype = dtype
        self.sigma = torch.tensor([p[3] for p in primitives], dtype=dtype)
        self.rgb = torch.tensor([p[4] for p in primitives], dtype=dtype)

    def _inside(self, pts: Tensor) -> Tensor:
        """pts (..., 3) -> (..., K) bool."""
        cols = []
        for kind, c, size, _, _ in self.primitives:
            q = pts - torch.tensor(c, dtype=pts.dtype)
            if kind == "sphere":
                cols.append((q * q).sum(-1) < size * size)
            else:
                cols.append((q.abs() < torch.tensor(size, dtype=pts.dtype)).all(-1))
        return torch.stack(cols, -1)

    def query(self, pts: Tensor) -> Tuple[Tensor, Tensor]:
        """Density (...,) and colour (..., 3) at points: sums over the primitives holding them."""
        inside = self._inside(pts).to(self.dtype)
        sig = inside * self.sigma
        total = sig.sum(-1)
        rgb = (sig[..., None] * self.rgb).sum(-2) / total.clamp(min=1e-30)[..., None]
        return total, rgb

    def _intervals(self, o: Tensor, d: Tensor) -> Tuple[Tensor, Tensor]:
        """Entry and exit depths (R, K) of each ray in each primitive (a = b when it misses)."""
        a_s, b_s = [], []
        for kind, c, size, _, _ in self.primitives:
            oc = o - torch.tensor(c, dtype=o.dtype)
            if kind == "sphere":  # |oc + t d|^2 = r^2
                dd = (d * d).sum(-1)
                b = (oc * d).sum(-1) / dd
                disc = b * b - ((oc * oc).sum(-1) - size * size) / dd
                root = disc.clamp(min=0).sqrt()
                hit = disc > 0
                a_s.append(torch.where(hit, -b - root, torch.zeros_like(b)))
                b_s.append(torch.where(hit, -b + root, torch.zeros_like(b)))
            else:  # slabs
                h = torch.tensor(size, dtype=o.dtype)
                inv = 1.0 / torch.where(d == 0, torch.full_like(d, 1e-300), d)
                t1, t2 = (-h - oc) * inv, (h - oc) * inv
                lo = torch.minimum(t1, t2).amax(-1)
                hi = torch.maximum(t1, t2).amin(-1)
                hit = hi > lo
                a_s.append(torch.where(hit, lo, torch.zeros_like(lo)))
                b_s.append(torch.where(hit, hi, torch.zeros_like(hi)))
        return torch.stack(a_s, -1), torch.stack(b_s, -1)

    def render(self, rays_o: Tensor, rays_d: Tensor, near: float, far: float, background: Tensor) -> Tensor:
        """Exact colours (R, 3) of rays through [near, far] over `background` (3,)."""
        o, d = rays_o.to(self.dtype), rays_d.to(self.dtype)
        a, b = self._intervals(o, d)
        a, b = a.clamp(near, far), b.clamp(near, far)
        R = o.shape[0]
        ends = torch.full((R, 1), near, dtype=self.dtype), torch.full((R, 1), far, dtype=self.dtype)
        cuts, _ = torch.sort(torch.cat([ends[0], a, b, ends[1]], -1), -1)  # every density change
        length = cuts[:, 1:] - cuts[:, :-1]
        mid = 0.5 * (cuts[:, 1:] + cuts[:, :-1])
        inside = ((a[:, None, :] < mid[..., None]) & (mid[..., None] < b[:, None, :])).to(self.dtype)  # (R, S, K)
        sig = inside * self.sigma
        total = sig.sum(-1)  # densities add; the colour is their weighted mean
        rgb = (sig[..., None] * self.rgb).sum(-2) / total.clamp(min=1e-30)[..., None]
        tau = total * length * d.norm(dim=-1, keepdim=True)
        trans = torch.exp(-(torch.cumsum(tau, -1) - tau))
        w = trans * (1.0 - torch.exp(-tau))
        t_far = torch.exp(-tau.sum(-1, keepdim=True))
        return (w[..., None] * rgb).sum(-2) + t_far * background.to(self.dtype)


# --------------------------------------------------------------------------------------------
# cameras and rays
# --------------------------------------------------------------------------------------------
def camera_poses(n: int, radius: float, g: torch.Generator, elev: Tuple[float, float] = (-25.0, 65.0)) -> Tensor:
    """n camera-to-world matrices (n, 3, 4) on a sphere, looking at the origin, z up; directions
    drawn uniformly in azimuth and in sin(elevation) within `elev` degrees."""
    az = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    s0, s1 = (math.sin(math.radians(e)) for e in elev)
    el = torch.asin(s0 + (s1 - s0) * torch.rand(n, generator=g, dtype=torch.float64))
    pos = radius * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    fwd = -F.normalize(pos, dim=-1)
    right = F.normalize(torch.cross(fwd, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(fwd), dim=-1),
                        dim=-1)
    up = torch.cross(right, fwd, dim=-1)
    return torch.stack([right, up, fwd, pos], -1)  # columns: x right, y up, z forward, centre


def camera_rays(poses: Tensor, size: int, fov_deg: float) -> Tuple[Tensor, Tensor]:
    """Pinhole rays through pixel centres: origins, unit directions (V, size * size, 3), rows top
    to bottom."""
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    j, i = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    cam = torch.stack([(i + 0.5 - size / 2) / f, -(j + 0.5 - size / 2) / f, torch.ones_like(i)], -1).reshape(-1, 3)
    d = F.normalize(torch.einsum("vab,nb->vna", poses[:, :, :3], cam), dim=-1)
    o = poses[:, None, :, 3].expand_as(d)
    return o.contiguous(), d


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def write_png(path: str, image: Tensor) -> None:
    """(H, W, 3) floats in [0, 1] -> 8-bit RGB PNG, with zlib and struct only."""
    img = (image.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu()
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].numpy().tobytes() for r in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class Progress:
    """A one-line progress bar on stderr (no dependency), redrawn at most every `every` seconds."""

    def __init__(self, total: int, every: float = 0.25, width: int = 24, stream=None):
        self.total, self.every, self.width = total, every, width
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def update(self, step: int, text: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        frac = step / max(1, self.total)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text} {el:.0f}s eta {eta:.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-12))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
# tiny: measured on 2 CPU cores, ~30 dB in 600 steps. view_width = width: with width // 2 = 32
# units the fine net's colour branch died once (a grey sphere, 24 dB) at lr 5e-3.
TINY = dict(depth=4, width=64, skips=(2,), view_width=64, pos_freqs=6, dir_freqs=2, n_coarse=32, n_fine=32)
PAPER = dict(depth=8, width=256, skips=(4,), pos_freqs=10, dir_freqs=4, n_coarse=64, n_fine=128)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def render_views(model: NeRF, rays_o: Tensor, rays_d: Tensor, near: float, far: float, background: Tensor,
                 chunk: int = 4096) -> Tuple[Tensor, Tensor]:
    """Deterministic (perturb=False) fine and coarse colours of (..., 3) rays, in chunks."""
    o, d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    fine, coarse = [], []
    for s in range(0, o.shape[0], chunk):
        out = model.render_rays(o[s:s + chunk], d[s:s + chunk], near, far, perturb=False, background=background)
        fine.append(out["rgb_fine"])
        coarse.append(out["rgb_coarse"])
    return torch.cat(fine).reshape(rays_o.shape), torch.cat(coarse).reshape(rays_o.shape)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(prog="python -m pyeccv.examples.nerf", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 600 tiny, 20000 --paper)")
    p.add_argument("--size", type=int, default=32, help="image height = width in pixels")
    p.add_argument("--batch", type=int, default=1024, help="rays per step")
    p.add_argument("--views", type=int, default=40, help="training views")
    p.add_argument("--test-views", type=int, default=4, help="held-out views")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 5e-3 tiny, 5e-4 --paper)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=".", help="directory for the PNG (or a path ending in .png)")
    p.add_argument("--png-scale", type=int, default=4, help="nearest-neighbour upscaling of the PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores, at least 1)")
    p.add_argument("--paper", action="store_true", help="paper-size model: 8 x 256 MLPs, 10/4 freqs, 64 + 128 samples")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training; stop early when exceeded, evaluation still runs "
                        "(default: 360 tiny, so a busy CPU still finishes well within 10 minutes; inf --paper)")
    args = p.parse_args(argv)

    cfg = dict(PAPER if args.paper else TINY)
    if args.time_budget is None:
        args.time_budget = math.inf if args.paper else 360.0
    if args.png_scale < 1:
        p.error(f"--png-scale must be >= 1, got {args.png_scale}")
    if not args.time_budget >= 0:
        p.error(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    steps = args.steps if args.steps is not None else (20000 if args.paper else 600)
    lr = args.lr if args.lr is not None else (5e-4 if args.paper else 5e-3)
    device = _pick_device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads if args.threads > 0 else _auto_threads())
    try:
        return _run(args, cfg, steps, lr, device)
    finally:
        torch.set_num_threads(threads)


def _auto_threads() -> int:
    """The cores this process may use (affinity) less those busy now (1-minute load average),
    at least 1: intra-op threads on oversubscribed cores wait on each other (measured on 2 cores
    with other work running: 2 threads took 2-3x longer per step than 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _run(args, cfg, steps: int, lr: float, device: torch.device) -> Dict[str, object]:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    radius, fov, near, far = 3.0, 40.0, 2.0, 4.0  # the scene lies within 0.9 of the origin
    scene = Scene()
    bg = torch.ones(3, dtype=torch.float64)  # white, known: passed to the renderer as `background`

    t0 = time.perf_counter()
    poses = camera_poses(args.views + args.test_views, radius, g)
    rays_o, rays_d = camera_rays(poses, args.size, fov)
    gt = torch.stack([scene.render(o, d, near, far, bg) for o, d in zip(rays_o, rays_d)])
    to = dict(device=device, dtype=torch.float32)
    tr_o, tr_d, tr_c = (x[:args.views].reshape(-1, 3).to(**to) for x in (rays_o, rays_d, gt))
    te_o, te_d, te_c = (x[args.views:].to(**to) for x in (rays_o, rays_d, gt))
    bg = bg.to(**to)
    print(f"scene: {len(scene.primitives)} primitives, {args.views} training + {args.test_views} held-out "
          f"{args.size}x{args.size} views ({time.perf_counter() - t0:.1f} s); device {device}"
          f"{f', threads={torch.get_num_threads()}' if device.type == 'cpu' else ''}; "
          f"model {'paper' if args.paper else 'tiny'} {cfg}")

    model = NeRF(**cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # exponential decay by 10x over the run (the official code: 10x per 250k steps, shorter runs
    # here); the run's progress is steps or time budget, whichever is further along
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    n_rays = tr_o.shape[0]

    bar = Progress(steps)
    t_train = time.perf_counter()
    done, loss_val = 0, float("nan")
    for step in range(steps):
        if time.perf_counter() - t_train > args.time_budget:
            break
        idx = torch.randint(0, n_rays, (args.batch,), device=device, generator=gen)
        out = model.render_rays(tr_o[idx], tr_d[idx], near, far, perturb=True, background=bg, generator=gen)
        target = tr_c[idx]
        loss_f = F.mse_loss(out["rgb_fine"], target)
        loss = loss_f + (F.mse_loss(out["rgb_coarse"], target) if model.fine is not None else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        progress = max(done / steps, (time.perf_counter() - t_train) / max(args.time_budget, 1e-9))
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** min(1.0, progress)
        if step % 10 == 0 or done == steps:
            loss_val = float(loss_f.detach())
            bar.update(done, f"mse {loss_val:.5f} ({psnr(loss_val):.1f} dB)", force=done == steps)
    bar.update(done, f"mse {loss_val:.5f} ({psnr(loss_val):.1f} dB)", force=True)
    bar.close()
    seconds = time.perf_counter() - t_train

    model.eval()
    pred, pred_c = render_views(model, te_o, te_d, near, far, bg)
    view_psnr = [psnr(float(F.mse_loss(a, b))) for a, b in zip(pred, te_c)]
    view_psnr_c = [psnr(float(F.mse_loss(a, b))) for a, b in zip(pred_c, te_c)]
    mean_psnr = sum(view_psnr) / len(view_psnr)
    mean_psnr_c = sum(view_psnr_c) / len(view_psnr_c)

    path = args.out if args.out.endswith(".png") else os.path.join(args.out, "nerf_heldout.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    s, k = args.size, args.png_scale
    side = torch.cat([pred[0].reshape(s, s, 3), te_c[0].reshape(s, s, 3)], 1)
    write_png(path, side.repeat_interleave(k, 0).repeat_interleave(k, 1))

    print(f"trained {done} steps in {seconds:.1f} s ({done * args.batch / max(seconds, 1e-9):.0f} rays/s)")
    print(f"held-out PSNR: {mean_psnr:.2f} dB (coarse {mean_psnr_c:.2f} dB; per view "
          f"{', '.join(f'{v:.2f}' for v in view_psnr)})")
    print(f"wrote {path} (left: NeRF, right: ground truth)")
    return {"psnr": mean_psnr, "psnr_coarse": mean_psnr_c, "psnr_views": view_psnr, "steps": done,
            "seconds": seconds, "png": path, "device": str(device), "config": cfg}


if __name__ == "__main__":
    main()
