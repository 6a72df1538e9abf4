"""Response-length predictors used by the EcoServe policy (no torch; the learned one uses numpy)."""
