"""Simulated vLLM-shaped GPU backend, for the demo, the tests and the benchmarks."""

__all__: list[str] = []
