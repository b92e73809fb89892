"""fedmla workers: local trainer, gRPC client, simulations, data."""
