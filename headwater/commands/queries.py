"""CLI commands: queries (filled in by its issue)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
