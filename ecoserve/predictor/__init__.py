"""Response-length predictors used by the EcoServe policy (pure Python, no torch)."""
