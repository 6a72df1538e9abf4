"""Paged KV cache: a block pool with reference counts and per-request block tables, shared by prefill and decode."""
