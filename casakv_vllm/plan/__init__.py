"""The per-batch plan: each row's policy and state (host) and the device plans."""
