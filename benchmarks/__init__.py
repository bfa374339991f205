"""pytest-benchmark suites of baffle-edge (see docs/benchmarks.md).

A package, so that its test modules are imported as ``benchmarks.test_*`` and cannot clash with
same-named modules in ``tests/``.
"""
