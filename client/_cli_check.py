"""`embedwarden` subcommands: check."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds this module's subcommands (none yet)."""
