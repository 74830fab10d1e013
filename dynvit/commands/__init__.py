"""Subcommands of the ``dynvit`` command line."""
