"""Subcommands kept in their own modules; cli.py registers them."""
