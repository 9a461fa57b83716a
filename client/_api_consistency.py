"""Client methods for consistency checks and parity reports (AdminService)."""

from __future__ import annotations

from ._base import ClientBase


class ConsistencyAPI(ClientBase):
    pass
