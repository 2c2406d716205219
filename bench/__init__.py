"""thinkstream's benchmark: a mock provider, a load generator and a runner.

Nothing here is imported by the relay or by its tests: benchmarks are measured,
never asserted on a clock. See ``bench/README.md``.
"""
