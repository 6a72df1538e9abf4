"""`ecoserve bench serve`: open-loop load on a running server; latency, SLO attainment and goodput."""
