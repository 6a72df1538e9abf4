"""Benchmarks: offline engine throughput, load generation, metrics, DistServe/vLLM comparisons, plots."""
