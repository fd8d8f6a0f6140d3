import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be
# set before triton is imported (pyeccv imports it lazily, so here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyeccv  # noqa: E402
from pyeccv import _backend  # noqa: E402

if not _backend.has_native():
    raise RuntimeError(
        f"pyeccv imported from {os.path.dirname(pyeccv.__file__)} has no compiled _C: install it "
        "(`pip install .`) and run `pytest` from the repository root (not `python -m pytest`)."
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    from pyeccv.__main__ import info_lines

    return info_lines()


@pytest.fixture
def g(request):
    """A fresh random generator per test; its seed is printed when the test fails."""
    from pyeccv.testing import generator

    gen = generator()
    request.node.user_properties.append(("seed", gen.initial_seed()))
    return gen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for k, v in item.user_properties:
            if k == "seed":
                rep.sections.append(("seed", f"reproduce with PYECCV_TEST_SEED={v}"))
