"""lipaudit: audit the Lipschitz constant of PyTorch checkpoints."""

__version__ = "0.1.0"
