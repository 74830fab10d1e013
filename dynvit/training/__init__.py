"""Training through Accelerate."""
