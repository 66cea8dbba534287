"""Training: synthetic recall tasks and their curriculum."""
