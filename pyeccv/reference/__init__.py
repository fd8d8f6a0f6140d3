"""Pure-PyTorch (and SciPy) references, faithful to each paper's official code.

They are the oracles for the tests and the baselines for the benchmarks; never the fast path.
"""
