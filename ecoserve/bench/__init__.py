"""Measurements only: engine throughput, KV transfer, serving load, scheduler and coordinator cost, soak, simulator fidelity, step-time profiling."""
