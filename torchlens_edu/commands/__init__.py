"""Subcommands of ``torchlens-edu``; each module exposes ``register(subparsers)``."""
