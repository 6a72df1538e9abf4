"""Prefill worker: runs batches of prompts and hands each request's KV to kv_transfer with the first token."""
