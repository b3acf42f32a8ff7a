"""Subcommands of the ``whisper-experts`` command line, one module each, each with ``register(subparsers)``."""
