"""`ecoserve bench sim-fidelity`: the simulator against the real CPU cluster on the same trace slice."""
