"""Venues: the contract (``base``) and its implementations (``simulated``)."""
