"""Client methods for similarity search (IndexService)."""

from __future__ import annotations

from ._base import ClientBase


class IndexAPI(ClientBase):
    pass
