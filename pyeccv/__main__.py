"""`python -m pyeccv info` and `python -m pyeccv bench ...`."""
from __future__ import annotations

import os
import platform
import sys
from typing import List

OPS = {
    "hungarian": ["linear_sum_assignment", "batch_linear_sum_assignment", "detr_match_cost"],
    "smooth_ap": ["smooth_ap_loss"],
    "grad_central": ["optim.SGD / Adam / AdamW (gc_mode)"],
    "volume_render": ["volume_render", "volume_render_alpha", "render_weights", "render_weights_from_alpha"],
    "cond_mask_head": ["cond_mask_head"],
    "dyn_group_conv": ["dyn_group_conv2d"],
}


def _serving(op: str, device: str) -> str:
    from . import _backend

    if op in ("linear_sum_assignment", "batch_linear_sum_assignment"):
        if device == "cpu":
            return "native (C++ JV + shortest augmenting path, OpenMP over the batch)"
        return "native (CUDA, block per problem)" if _backend.has_cuda_kernels() else "native CPU via host copy"
    if op == "detr_match_cost":
        if device == "cpu":
            return "native (C++ fused, OpenMP over queries)"
        return "triton (fused)" if _backend.has_triton() else "native (vectorised torch)"
    if op.startswith("optim."):
        if device == "cpu":
            return "native (C++ fused multi-tensor step, OpenMP)"
        return "triton (one multi-tensor launch per group)" if _backend.has_triton() else "unavailable (needs triton)"
    if op == "smooth_ap_loss":
        if device == "cpu":
            return "native (C++ per query, OpenMP; S and dX by torch matmul)"
        return "triton (ranks + analytic gradient)" if _backend.has_triton() else "unavailable (needs triton)"
    if op.startswith("volume_render") or op.startswith("render_weights"):
        if device == "cpu":
            return "native (C++ per ray, OpenMP over rays; recomputing backward)"
        return "triton (tiles of 8 rays x 32 samples, scans along rays, rays sorted by length)" if _backend.has_triton() else "unavailable (needs triton)"
    if op == "cond_mask_head":
        if device == "cpu":
            return "native (C++ per (image, pixel tile), OpenMP; recomputing backward)"
        return "triton (MLP per (instance, pixel tile) in registers)" if _backend.has_triton() else "unavailable (needs triton)"
    if op == "dyn_group_conv2d":
        if device == "cpu":
            return "native (C++ implicit GEMM over the kept channels per (sample, head), OpenMP)"
        return ("triton (implicit GEMM over the kept channels, tensor cores)" if _backend.has_triton()
                else "torch (gather + grouped conv2d; pip install triton for the fused kernels)")
    return "?"


def info_lines() -> List[str]:
    import torch

    from . import __version__, _backend

    lines = [f"pyeccv {__version__} | python {platform.python_version()} | torch {torch.__version__}"]
    if _backend.has_native():
        lines.append(f"_C: {_backend.C().build_info()}")
    else:
        lines.append("_C: MISSING (not installed?)")
    tri = "no"
    if _backend.has_triton():
        import importlib.metadata as md

        try:
            tri = md.version("triton")
        except md.PackageNotFoundError:
            tri = "yes"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines.append(f"CUDA kernels in _C: {_backend.has_cuda_kernels()} | triton: {tri}"
                 f"{' (interpreter)' if _backend.triton_interpreter() else ''} | GPU: {gpu}"
                 f" | torch CUDA: {torch.version.cuda}")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    if _backend.has_native():
        lines.append(f"CPU: {_backend.cpu_model()} | {platform.machine()} | ISA variants this CPU runs: "
                     f"{', '.join(_backend.available_cpu_isas())} (compiled: {', '.join(_backend.compiled_cpu_isas())})"
                     f" | in use: {_backend.cpu_isa()} (PYECCV_CPU_ISA={os.environ.get('PYECCV_CPU_ISA', 'auto') or 'auto'})")
    for core, ops in OPS.items():
        for op in ops:
            lines.append(f"  {core:10s} {op:30s} cpu: {_serving(op, 'cpu')}")
            lines.append(f"  {'':10s} {'':30s} cuda: {_serving(op, 'cuda')}")
    return lines


def main(argv: List[str] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m pyeccv {info,bench} ...\n  info   versions and which backend serves each op\n"
              "  bench  the benchmark CLI (python -m pyeccv bench --help)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        print("\n".join(info_lines()))
        return 0
    if cmd == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"unknown command {cmd!r}; use info or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
