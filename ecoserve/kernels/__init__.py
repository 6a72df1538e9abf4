"""Triton kernels for paged KV attention and movement, each beside a pure-torch reference and a checked wrapper."""
