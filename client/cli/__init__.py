"""The `embedwarden` command line (`main`); see `_main` for how its commands are grouped."""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
