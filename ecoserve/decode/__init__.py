"""Decode worker: continuous batching over paged KV, streaming token events."""
