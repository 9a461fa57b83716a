"""Proof, continuously, that each model version computes what its manifest defines.

`ConsistencyMonitor` runs the checks (weights, restart against the golden record, co-load,
batch invariance, preprocessing, process flags, cache audit) at load and then periodically;
`ParityMonitor` compares two models stage by stage. Modules: `_canaries` (the fixed inputs),
`_golden` (records of a version's first load), `_checks` (running and comparing canaries),
`_tolerance` (how numbers are judged), `_audit` (sampling served cache hits and recomputing
them), `_flags` (process-wide flags), `_report` (rows, their words and metrics), `_worker` (the
background thread), `_monitor`, `_parity`.
"""

from ._checks import cosines
from ._monitor import ConsistencyMonitor
from ._parity import (
    ParityMonitor,
    ParityReport,
    compare_arrays,
    compare_models,
    parse_pairs,
    to_channels_last,
)
from ._report import Report
from ._tolerance import EXACT, Tolerance

__all__ = [
    "EXACT",
    "ConsistencyMonitor",
    "ParityMonitor",
    "ParityReport",
    "Report",
    "Tolerance",
    "compare_arrays",
    "compare_models",
    "cosines",
    "parse_pairs",
    "to_channels_last",
]
