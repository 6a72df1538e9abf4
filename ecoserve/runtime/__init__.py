"""What every worker rank shares: the torch.distributed world, the control channel, heartbeats, KV-transfer polling and fault injection."""
