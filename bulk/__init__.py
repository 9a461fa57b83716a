"""`embedwarden.ray`: bulk extraction on a Ray cluster into a Parquet dataset (extra
`embedwarden[ray]`).

Each Ray actor loads the pinned model version with the server's own code and checks it (the
fingerprint against the driver's, the weights hash, the canaries against the golden record the
driver ships) before embedding anything; see `_actor`. The driver writes the rows, an errors
table for bad inputs, resumes a folder of the same job, and checks the result (`verify`).
"""

from ._job import ClusterError, Summary, extract_to_parquet, resolve_inputs
from ._output import JobSpec, OutputError, Verdict, verify

__all__ = [
    "ClusterError",
    "JobSpec",
    "OutputError",
    "Summary",
    "Verdict",
    "extract_to_parquet",
    "resolve_inputs",
    "verify",
]
