"""Verification of vectors that other pipelines made (a user's export, a re-implementation):
each is judged against this server's reference for its model version, and a failing one is
matched against a catalogue of known preprocessing mistakes (`_catalogue`) to name the likely
cause. `_compare` judges one vector; `_service` is the Verify use case.

Above `consistency` (whose tolerance and cosine it uses) and `serving`; below `rpc`.
"""

from ._catalogue import MISTAKES, Mistake, names
from ._compare import ItemComparison, Verdict
from ._service import (
    DiagnosisState,
    MistakeMatch,
    VerificationService,
    VerifiedItem,
    VerifyOptions,
    VerifyResult,
)

__all__ = [
    "MISTAKES",
    "DiagnosisState",
    "ItemComparison",
    "Mistake",
    "MistakeMatch",
    "Verdict",
    "VerificationService",
    "VerifiedItem",
    "VerifyOptions",
    "VerifyResult",
    "names",
]
