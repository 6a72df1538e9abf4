"""Coordinator: front door, request lifecycle and scheduling policies (pure Python, no torch)."""
