"""Shared by every process: configuration, Redis keys and clients, the order's model and store, exact amounts and JSON."""
