"""Data sets shipped with dynvit."""
