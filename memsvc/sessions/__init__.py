"""Session lifecycle, residency tiers, write-ahead logs and checkpoints."""
