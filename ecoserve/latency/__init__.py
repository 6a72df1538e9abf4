"""Step-time models: the DistServe-form latency profile, its fitting, and the cost model policies use."""
