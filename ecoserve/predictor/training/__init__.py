"""Training and evaluation of the learned response-length predictor (`ecoserve predictor train|eval`)."""
