"""Discrete-event simulator that drives the coordinator policies unchanged against latency models."""
