"""Client methods for the consistency monitor (AdminService.CheckConsistency)."""

from __future__ import annotations

from embedwarden.v1 import admin_pb2, types_pb2

from ._base import ClientBase

CHECK_TIMEOUT_S = 600.0  # a full check embeds every canary, alone and in a full batch


class ConsistencyAPI(ClientBase):
    def check_consistency(
        self, model: str | None = None, *, timeout: float | None = None
    ) -> admin_pb2.CheckConsistencyResponse:
        """Runs the consistency checks now, on `model` ("NAME" or "NAME@VERSION") or on every
        loaded model, and returns the report: `passed`, and one `CheckResult` per check and
        layer (max abs difference, min cosine, tolerance, detail, time of the run). Models whose
        load failed a consistency check are included with their load-time results."""
        request = admin_pb2.CheckConsistencyRequest()
        if model:
            name, _, version = model.partition("@")
            request.model.CopyFrom(types_pb2.ModelRef(name=name, version=version))
        deadline = timeout if timeout is not None else max(self.timeout, CHECK_TIMEOUT_S)
        response: admin_pb2.CheckConsistencyResponse = self._call(
            self._admin.CheckConsistency, request, deadline
        )
        return response
