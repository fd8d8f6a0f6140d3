"""Hungarian matching core: batched exact linear assignment and the DETR matching cost.

Oracles: SciPy's linear_sum_assignment (total cost always; indices where the optimum is unique,
which it is with probability 1 for continuous random costs) and the official DETR cost.
"""
import math
import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import pyeccv
from pyeccv import testing
from pyeccv.ops import hungarian as H
from pyeccv.reference import hungarian as ref

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 5), (13, 31), (31, 13), (33, 33), (97, 127), (127, 97)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def total(c: np.ndarray, rows, cols) -> float:
    return float(np.asarray(c, dtype=np.float64)[np.asarray(rows), np.asarray(cols)].sum())


def check_against_scipy(c: np.ndarray, col_for_row: np.ndarray, maximize=False, unique=True):
    """col_for_row (N,) from pyeccv vs SciPy on the float64 values of c."""
    c64 = np.asarray(c, dtype=np.float64)
    r, k = scipy_lsa(c64, maximize=maximize)
    rows = np.flatnonzero(col_for_row >= 0)
    assert len(rows) == min(c64.shape), f"{len(rows)} rows assigned, expected {min(c64.shape)}"
    assert len(set(col_for_row[rows].tolist())) == len(rows), "a column is used twice"
    want, got = total(c64, r, k), total(c64, rows, col_for_row[rows])
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-9), f"total {got!r} != SciPy {want!r}"
    if unique:
        np.testing.assert_array_equal(rows, r)
        np.testing.assert_array_equal(col_for_row[rows], k)


def solve(cost, solver, **kw):
    """Runs a pyeccv solver variant on a (B, N, M) tensor, returns (B, N) numpy."""
    if solver == "native":
        out = pyeccv.batch_linear_sum_assignment(cost, **kw)
    elif solver == "op":
        out = torch.ops.pyeccv.lsap_batch(cost, kw.get("num_rows"), kw.get("num_cols"), kw.get("maximize", False))
    else:  # the CUDA block algorithm on CPU threads: team of 3 (odd stride) or 32 (one warp)
        col, status = H._lsap_native(cost, kw.get("num_rows"), kw.get("num_cols"), kw.get("maximize", False),
                                     team_size=int(solver.split("-")[1]))
        H._raise_for_status(status, rows=cost.shape[1], cols=cost.shape[2])
        out = col
    return out.cpu().numpy()


SOLVERS = ["native", "op", "team-3", "team-32"]


# ---- exactness against SciPy ---------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_shapes(solver, dtype, g):
    for (n, m) in SHAPES:
        cost = testing.rand(3, n, m, dtype=dtype, g=g, low=-2.0, high=5.0)
        with testing.poisoned():
            out = solve(cost, solver)
        for b in range(3):
            check_against_scipy(cost[b].numpy(), out[b])


@pytest.mark.parametrize("solver", SOLVERS)
def test_integer_costs_with_ties(solver, g):
    for (n, m) in SHAPES:
        cost = torch.randint(0, 4, (4, n, m), generator=g).to(torch.float64)
        out = solve(cost, solver)
        for b in range(4):
            check_against_scipy(cost[b].numpy(), out[b], unique=False)


@pytest.mark.parametrize("solver", SOLVERS)
def test_maximize(solver, g):
    for (n, m) in [(4, 9), (9, 4), (17, 17)]:
        cost = testing.rand(2, n, m, dtype=torch.float64, g=g)
        out = solve(cost, solver, maximize=True)
        for b in range(2):
            check_against_scipy(cost[b].numpy(), out[b], maximize=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, g):
    cost = testing.rand(3, 11, 17, dtype=dtype, g=g)
    out = pyeccv.batch_linear_sum_assignment(cost).numpy()
    for b in range(3):  # half values are exact in float64: same optimum (ties possible)
        check_against_scipy(cost[b].to(torch.float64).numpy(), out[b], unique=False)


@pytest.mark.parametrize("solver", ["native", "team-3"])
def test_non_contiguous(solver, g):
    base = testing.rand(4, 40, 30, dtype=torch.float64, g=g)
    for cost in (base.transpose(1, 2), base[:, ::3, 1::2], base[::2], base[:, :, :1].expand(4, 40, 30)):
        assert not cost.is_contiguous()
        out = solve(cost, solver)
        for b in range(cost.shape[0]):  # the broadcast one (stride 0) is all ties
            check_against_scipy(cost[b].numpy(), out[b], unique=cost.stride(2) != 0)


def test_larger_square_and_rectangular(g):
    for (n, m) in [(257, 257), (300, 100), (100, 300), (500, 500)]:
        cost = testing.rand(1, n, m, dtype=torch.float32, g=g)
        check_against_scipy(cost[0].numpy(), pyeccv.batch_linear_sum_assignment(cost)[0].numpy())


@pytest.mark.parametrize("solver", SOLVERS)
def test_forbidden_edges_feasible(solver, g):
    for (n, m) in [(6, 6), (5, 9), (9, 5), (30, 30)]:
        cost = testing.rand(3, n, m, dtype=torch.float64, g=g)
        # forbid a random 40% of the pairs but keep a guaranteed perfect matching of the smaller side
        mask = torch.rand(3, n, m, generator=g) < 0.4
        perm = torch.randperm(max(n, m), generator=g)
        k = min(n, m)
        if n <= m:
            mask[:, torch.arange(k), perm[:k]] = False
        else:
            mask[:, perm[:k], torch.arange(k)] = False
        cost[mask] = math.inf
        out = solve(cost, solver)
        for b in range(3):
            check_against_scipy(cost[b].numpy(), out[b])


@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_names_batch_index(solver):
    cost = torch.rand(3, 4, 4, dtype=torch.float64)
    cost[1, :, 2] = math.inf  # column 2 of problem 1 can't be matched
    cost[1, :, 3] = math.inf
    with pytest.raises(ValueError, match=r"cost\[1\]: cost matrix is infeasible"):
        solve(cost, solver)
    cost = torch.rand(2, 3, 5, dtype=torch.float64)
    cost[0, 1, :] = math.inf  # a row with no allowed column
    with pytest.raises(ValueError, match=r"cost\[0\]: cost matrix is infeasible"):
        solve(cost, solver)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("bad,maximize", [(math.nan, False), (-math.inf, False), (math.nan, True), (math.inf, True)])
def test_invalid_entries(solver, bad, maximize):
    cost = torch.rand(4, 5, 6, dtype=torch.float64)
    cost[2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"cost\[2\]: matrix contains invalid numeric entries"):
        solve(cost, solver, maximize=maximize)


def test_minus_inf_is_forbidden_when_maximizing(g):
    cost = testing.rand(1, 5, 5, dtype=torch.float64, g=g)
    cost[0, 0, 0] = -math.inf
    out = pyeccv.batch_linear_sum_assignment(cost, maximize=True).numpy()
    check_against_scipy(cost[0].numpy(), out[0], maximize=True)
    assert out[0, 0] != 0


@pytest.mark.parametrize("solver", SOLVERS)
def test_empty_problems(solver):
    for shape in [(0, 4, 4), (3, 0, 4), (3, 4, 0), (0, 0, 0)]:
        cost = torch.rand(*shape, dtype=torch.float64)
        out = solve(cost, solver)
        assert out.shape == shape[:2]
        assert (out == -1).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_ragged_padding_is_ignored(solver, g):
    B, N, M = 6, 9, 12
    cost = testing.rand(B, N, M, dtype=torch.float64, g=g)
    num_rows = torch.tensor([9, 1, 4, 0, 9, 7])
    num_cols = torch.tensor([12, 3, 4, 5, 0, 2])
    for b in range(B):  # poison the padding: it must never be read as a cost
        cost[b, int(num_rows[b]):, :] = math.nan
        cost[b, :, int(num_cols[b]):] = -math.inf
    with testing.poisoned():
        out = solve(cost, solver, num_rows=num_rows, num_cols=num_cols)
    for b in range(B):
        nr, nc = int(num_rows[b]), int(num_cols[b])
        assert (out[b, nr:] == -1).all()
        if nr and nc:
            check_against_scipy(cost[b, :nr, :nc].numpy(), out[b, :nr])
        else:
            assert (out[b] == -1).all()


def test_num_rows_num_cols_validation():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"num_cols\[1\] is outside \[0, 4\]"):
        pyeccv.batch_linear_sum_assignment(cost, num_cols=[4, 5])
    with pytest.raises(ValueError, match=r"num_rows\[0\] is outside \[0, 3\]"):
        pyeccv.batch_linear_sum_assignment(cost, num_rows=[-1, 2])
    with pytest.raises(ValueError, match=r"num_rows must have shape \(2,\)"):
        pyeccv.batch_linear_sum_assignment(cost, num_rows=[1, 2, 3])
    with pytest.raises(ValueError, match="num_cols must hold integers"):
        pyeccv.batch_linear_sum_assignment(cost, num_cols=torch.tensor([1.0, 2.0]))


def test_bad_cost_arguments():
    with pytest.raises(ValueError, match=r"cost must be 3-D"):
        pyeccv.batch_linear_sum_assignment(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"cost must have dtype in"):
        pyeccv.batch_linear_sum_assignment(torch.ones(1, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="cost must be a torch.Tensor"):
        pyeccv.batch_linear_sum_assignment(np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="backend must be one of"):
        pyeccv.batch_linear_sum_assignment(torch.rand(1, 2, 2), backend="fast")


def test_reference_backend_matches(g):
    cost = testing.rand(5, 8, 6, dtype=torch.float64, g=g)
    np.testing.assert_array_equal(pyeccv.batch_linear_sum_assignment(cost, backend="reference").numpy(),
                                  pyeccv.batch_linear_sum_assignment(cost).numpy())


# ---- linear_sum_assignment: SciPy's drop-in ---------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (3, 8), (8, 3), (0, 5), (5, 0), (0, 0), (40, 23)])
@pytest.mark.parametrize("maximize", [False, True])
def test_lsa_numpy_in_numpy_out(shape, maximize, g):
    c = testing.rand(*shape, dtype=torch.float64, g=g).numpy()
    r, k = pyeccv.linear_sum_assignment(c, maximize=maximize)
    rr, kk = scipy_lsa(c, maximize=maximize)
    assert isinstance(r, np.ndarray) and isinstance(k, np.ndarray)
    assert r.dtype == np.int64 and k.dtype == np.int64
    np.testing.assert_array_equal(r, rr)
    np.testing.assert_array_equal(k, kk)


def test_lsa_numpy_dtypes_and_layouts(g):
    c = testing.rand(9, 6, dtype=torch.float64, g=g).numpy()
    for x in (c.astype(np.float32), c.astype(np.float16), (c * 10).astype(np.int32), c > 0.5, c.T, c[::2, ::-1],
              np.asfortranarray(c), c.astype(">f8")):
        r, k = pyeccv.linear_sum_assignment(x)
        rr, kk = scipy_lsa(x)
        assert math.isclose(total(x, r, k), total(x, rr, kk), rel_tol=1e-12, abs_tol=1e-12)


def test_lsa_torch_in_torch_out(g):
    c = testing.rand(6, 10, dtype=torch.float32, g=g)
    r, k = pyeccv.linear_sum_assignment(c)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.int64
    rr, kk = scipy_lsa(c.numpy())
    np.testing.assert_array_equal(r.numpy(), rr)
    np.testing.assert_array_equal(k.numpy(), kk)
    r, k = pyeccv.linear_sum_assignment(c.T.contiguous().to(torch.float16))
    rr, kk = scipy_lsa(c.T.to(torch.float16).to(torch.float64).numpy())
    assert math.isclose(total(c.T.to(torch.float16).numpy(), r, k), total(c.T.to(torch.float16).numpy(), rr, kk),
                        rel_tol=1e-12)


class _DLPackOnly:
    """A foreign array type that only speaks DLPack (as CuPy or JAX arrays do)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, **kw):
        return self._t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_lsa_dlpack_input(g):
    c = testing.rand(5, 7, dtype=torch.float64, g=g)
    r, k = pyeccv.linear_sum_assignment(_DLPackOnly(c))
    rr, kk = scipy_lsa(c.numpy())
    np.testing.assert_array_equal(np.asarray(r), rr)
    np.testing.assert_array_equal(np.asarray(k), kk)


def test_lsa_errors_match_scipy():
    for bad in ([[math.nan, 1.0], [1.0, 2.0]], [[-math.inf, 1.0], [1.0, 2.0]]):
        for x in (np.array(bad), torch.tensor(bad)):
            with pytest.raises(ValueError, match="^matrix contains invalid numeric entries$"):
                pyeccv.linear_sum_assignment(x)
    inf = [[math.inf, 1.0], [math.inf, 2.0]]
    for x in (np.array(inf), torch.tensor(inf)):
        with pytest.raises(ValueError, match="^cost matrix is infeasible$"):
            pyeccv.linear_sum_assignment(x)
    with pytest.raises(ValueError, match="expected a matrix"):
        pyeccv.linear_sum_assignment(np.ones(3))
    with pytest.raises(ValueError, match="expected a matrix"):
        pyeccv.linear_sum_assignment(torch.ones(2, 2, 2))


# ---- custom-op contract: opcheck and torch.compile ---------------------------------------------------
def test_opcheck_lsap(g):
    cost = testing.rand(3, 7, 5, dtype=torch.float32, g=g)
    nr, nc = torch.tensor([7, 3, 0]), torch.tensor([5, 5, 2])
    for args in [(cost, None, None, False), (cost, nr, nc, True), (cost.transpose(1, 2), None, nc[:3], False)]:
        testing.opcheck(torch.ops.pyeccv.lsap_batch.default, args, skip_autograd=True)
        testing.opcheck(torch.ops.pyeccv.lsap_batch_unchecked.default, args, skip_autograd=True)
    testing.opcheck(torch.ops.pyeccv.lsap_single.default, (cost[0].T, True), skip_autograd=True)


def test_compile_fullgraph(g):
    cost = testing.rand(4, 9, 6, dtype=torch.float32, g=g)
    nc = torch.tensor([6, 2, 3, 0])

    def f(c, n):
        col = pyeccv.batch_linear_sum_assignment(c * 2.0 + 1.0, num_cols=n)
        return col + 1

    testing.compile_check(f, cost, nc)

    def h(c):
        return pyeccv.linear_sum_assignment(c)

    testing.compile_check(h, cost[0], compare=lambda a, b: [torch.testing.assert_close(x, y) for x, y in zip(a, b)])


# ---- DETR matching cost ---------------------------------------------------------------------------
def detr_inputs(B, Q, K, counts, dtype=torch.float64, g=None, device="cpu"):
    logits = testing.randn(B, Q, K, dtype=dtype, g=g, device=device)
    boxes = testing.rand(B, Q, 4, dtype=dtype, g=g, low=0.05, high=0.6, device=device)
    T = sum(counts)
    labels = torch.randint(0, K, (T,), generator=g).to(device)
    tboxes = testing.rand(T, 4, dtype=dtype, g=g, low=0.05, high=0.6, device=device)
    return logits, boxes, labels, tboxes


COST_CASES = [(1, 1, 1, [1]), (2, 5, 3, [0, 4]), (3, 37, 91, [2, 0, 70]), (4, 33, 17, [5, 1, 33, 7]),
              (2, 100, 92, [20, 13])]


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("backend", ["native", "auto", "triton"])
def test_detr_cost_matches_official(focal, backend, g):
    dev = "cpu"
    if backend == "triton":
        dev = testing.triton_device()
        if dev is None:
            pytest.skip("Triton not available")
    for B, Q, K, counts in COST_CASES:
        if backend == "triton" and dev == "cpu" and Q * sum(counts) > 3000:
            continue  # the interpreter is slow; the GPU run covers the larger shapes
        for dtype in (torch.float64, torch.float32):
            args = detr_inputs(B, Q, K, counts, dtype=dtype, g=g, device=dev)
            want = ref.padded_cost(*(a.double() if a.is_floating_point() else a for a in args), counts, focal=focal)
            with testing.poisoned():
                got = pyeccv.detr_match_cost(*args, counts, focal=focal, backend=backend)
            assert got.dtype == dtype
            testing.assert_close(got, want, "elementwise", dtype, name=f"cost {B}x{Q}x{K} {counts}",
                                 floor=math.sqrt(want.isfinite().sum().item()))
            # (each entry sums O(1) terms - class, L1, GIoU - that can cancel to ~1e-2: CI drew a 1 x 1
            # cost of -0.0089 off by 2.4e-7 in float32, so the error is relative to an O(1) scale per entry)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_detr_cost_half_inputs(dtype, g):
    args = detr_inputs(2, 19, 11, [3, 6], dtype=dtype, g=g)
    want = ref.padded_cost(*(a.double() if a.is_floating_point() else a for a in args), [3, 6])
    got = pyeccv.detr_match_cost(*args, [3, 6])
    assert got.dtype == torch.float32
    testing.assert_close(got, want, "elementwise", torch.float32)


def test_detr_cost_weights_and_focal_params(g):
    args = detr_inputs(2, 13, 7, [4, 2], g=g)
    kw = dict(cost_class=0.5, cost_bbox=0.0, cost_giou=3.0, focal_alpha=0.4, focal_gamma=1.5)
    for focal in (False, True):
        testing.assert_close(pyeccv.detr_match_cost(*args, [4, 2], focal=focal, **kw),
                             ref.padded_cost(*args, [4, 2], focal=focal, **kw), "elementwise", torch.float64)


def test_detr_cost_non_contiguous(g):
    logits, boxes, labels, tboxes = detr_inputs(3, 11, 9, [2, 3, 4], g=g)
    lt = logits.transpose(0, 1).contiguous().transpose(0, 1)
    bt = torch.cat([boxes, boxes], 2)[:, :, ::2]
    tt = tboxes.t().contiguous().t()
    testing.assert_close(pyeccv.detr_match_cost(lt, bt, labels[:, None].expand(-1, 2)[:, 0], tt, [2, 3, 4]),
                         ref.padded_cost(lt, bt, labels, tt, [2, 3, 4]), "elementwise", torch.float64)


def test_detr_cost_bad_inputs():
    logits, boxes, labels, tboxes = detr_inputs(2, 5, 4, [1, 2])
    with pytest.raises(ValueError, match=r"tgt_labels must be in \[0, 4\)"):
        pyeccv.detr_match_cost(logits, boxes, labels + 4, tboxes, [1, 2])
    with pytest.raises(ValueError, match=r"num_targets must sum to the number of targets \(3\)"):
        pyeccv.detr_match_cost(logits, boxes, labels, tboxes, [1, 1])
    with pytest.raises(ValueError, match=r"num_targets must have one count per image \(2\)"):
        pyeccv.detr_match_cost(logits, boxes, labels, tboxes, [3])
    with pytest.raises(ValueError, match=r"pred_boxes must have shape \(2, 5, 4\)"):
        pyeccv.detr_match_cost(logits, boxes[:, :4], labels, tboxes, [1, 2])
    with pytest.raises(ValueError, match=r"tgt_boxes must have shape \(3, 4\)"):
        pyeccv.detr_match_cost(logits, boxes, labels, tboxes[:2], [1, 2])
    with pytest.raises(ValueError, match="tgt_labels must be an integer tensor"):
        pyeccv.detr_match_cost(logits, boxes, labels.float(), tboxes, [1, 2])
    with pytest.raises(ValueError, match="pred_logits must be 3-D"):
        pyeccv.detr_match_cost(logits[0], boxes, labels, tboxes, [1, 2])


def test_opcheck_and_compile_detr_cost(g):
    counts = [3, 0, 5]
    args = detr_inputs(3, 6, 5, counts, dtype=torch.float32, g=g)
    nt = torch.tensor(counts)
    for focal in (False, True):
        testing.opcheck(torch.ops.pyeccv.detr_match_cost.default,
                        (*args, nt, 5, 1.0, 5.0, 2.0, focal, 0.25, 2.0), skip_autograd=True)

    def f(logits, boxes, labels, tboxes):
        c = pyeccv.detr_match_cost(logits, boxes, labels, tboxes, counts)
        return pyeccv.batch_linear_sum_assignment(c, num_cols=torch.tensor(counts))

    testing.compile_check(f, *args)


# ---- GPU: the same contract on CUDA tensors ----------------------------------------------------------
@pytest.mark.cuda
def test_cuda_lsap_against_scipy(g):
    for dtype in (torch.float32, torch.float64, torch.float16):
        for (n, m) in SHAPES + [(300, 100), (100, 300), (1000, 1000)]:
            cost = testing.rand(3, n, m, dtype=dtype, g=g, device="cuda")
            with testing.poisoned():
                out = pyeccv.batch_linear_sum_assignment(cost)
            assert out.device.type == "cuda"
            for b in range(3):
                check_against_scipy(cost[b].double().cpu().numpy(), out[b].cpu().numpy(),
                                    unique=dtype != torch.float16)


@pytest.mark.cuda
def test_cuda_lsap_edge_cases(g):
    cost = torch.rand(3, 4, 4, dtype=torch.float64, device="cuda")
    cost[1, :, 2:] = math.inf
    with pytest.raises(ValueError, match=r"cost\[1\]: cost matrix is infeasible"):
        pyeccv.batch_linear_sum_assignment(cost)
    cost[1] = 0.5
    cost[2, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"cost\[2\]: matrix contains invalid numeric entries"):
        pyeccv.batch_linear_sum_assignment(cost)
    for shape in [(0, 4, 4), (3, 0, 4), (3, 4, 0)]:
        out = pyeccv.batch_linear_sum_assignment(torch.rand(*shape, device="cuda"))
        assert out.shape == shape[:2] and (out == -1).all()
    ints = torch.randint(0, 3, (8, 20, 30), generator=g).double().cuda()
    nc = torch.tensor([30, 1, 2, 20, 0, 30, 7, 29], device="cuda")
    out = pyeccv.batch_linear_sum_assignment(ints, num_cols=nc).cpu().numpy()
    for b in range(8):
        n = int(nc[b])
        if n:
            check_against_scipy(ints[b, :, :n].cpu().numpy(), out[b], unique=False)
    big = testing.rand(2, 700, 900, g=g, device="cuda")
    ints = torch.randint(0, 5, (3, 60, 45), generator=g).double().cuda()
    # every team (warp / block) with the state in shared memory and in global memory
    for team in ("warp", "block"):
        for force_global in ("1", "0"):
            os.environ["PYECCV_LSAP_TEAM"] = team
            os.environ["PYECCV_LSAP_GLOBAL_STATE"] = force_global
            try:
                out = pyeccv.batch_linear_sum_assignment(big).cpu().numpy()
                out_i = pyeccv.batch_linear_sum_assignment(ints).cpu().numpy()
            finally:
                os.environ.pop("PYECCV_LSAP_GLOBAL_STATE")
                os.environ.pop("PYECCV_LSAP_TEAM")
            for b in range(2):
                check_against_scipy(big[b].cpu().numpy(), out[b])
            for b in range(3):
                check_against_scipy(ints[b].cpu().numpy(), out_i[b], unique=False)


@pytest.mark.cuda
def test_cuda_lsa_and_compile(g):
    c = testing.rand(9, 13, g=g, device="cuda")
    r, k = pyeccv.linear_sum_assignment(c)
    assert r.device.type == "cuda"
    rr, kk = scipy_lsa(c.cpu().numpy())
    np.testing.assert_array_equal(r.cpu().numpy(), rr)
    np.testing.assert_array_equal(k.cpu().numpy(), kk)
    testing.compile_check(lambda x: pyeccv.batch_linear_sum_assignment(x * 3.0), c[None])


@pytest.mark.cuda
@pytest.mark.parametrize("focal", [False, True])
def test_cuda_detr_cost(focal, g):
    for B, Q, K, counts in COST_CASES + [(16, 900, 91, [100] * 16)]:
        args = detr_inputs(B, Q, K, counts, dtype=torch.float32, g=g, device="cuda")
        want = ref.padded_cost(*(a.double() if a.is_floating_point() else a for a in args), counts, focal=focal)
        got = pyeccv.detr_match_cost(*args, counts, focal=focal)
        testing.assert_close(got, want, "elementwise", torch.float32)


def test_random_sweep_all_solvers(g):
    """Hundreds of tiny problems of every shape, value kind and forbidden pattern; the serial
    solver and the block algorithm (thread teams of several sizes) against SciPy."""
    for trial in range(300):
        n, m = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        kind = trial % 4
        if kind == 0:
            c = testing.rand(2, n, m, dtype=torch.float64, g=g, low=-3, high=3)
        elif kind == 1:
            c = torch.randint(0, 3, (2, n, m), generator=g).to(torch.float64)
        elif kind == 2:
            c = testing.rand(2, n, m, dtype=torch.float32, g=g)
        else:  # sparse allowed pairs: sometimes infeasible
            c = testing.rand(2, n, m, dtype=torch.float64, g=g)
            c[torch.rand(2, n, m, generator=g) < 0.5] = math.inf
        maximize = trial % 5 == 0
        if maximize:
            c = torch.where(torch.isinf(c), -c, c)
        team = [3, 5, 8, 32][trial % 4]
        for solver in ("native", f"team-{team}"):
            feasible = True
            want = None
            try:
                want = [scipy_lsa(c[b].double().numpy(), maximize=maximize) for b in range(2)]
            except ValueError:
                feasible = False
            if not feasible:
                with pytest.raises(ValueError, match="infeasible"):
                    solve(c, solver, maximize=maximize)
                continue
            out = solve(c, solver, maximize=maximize)
            for b in range(2):
                check_against_scipy(c[b].numpy(), out[b], maximize=maximize, unique=kind in (0, 2))
