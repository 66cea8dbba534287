"""Evaluations of a trained model: needle-in-a-haystack recall at any length."""
