"""sweeper: keeps shared GPU servers' disks from filling with PyTorch training checkpoints."""

__version__ = "0.1.0"
