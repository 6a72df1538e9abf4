"""KV block transfer between prefill and decode ranks over torch.distributed P2P; control over ZeroMQ."""
