"""fedeen: federated training of early-exit networks across heterogeneous device budgets."""
__version__ = "0.1.0"
