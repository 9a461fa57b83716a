"""Cold start to SERVING and resident memory per loaded model.

- cold start: a fresh data directory, so the first load records the golden embeddings;
- warm restart: the same directory again, so the restart consistency check compares against
  them before the health service reports SERVING;
- memory: resident set size of a server with no model, then after loading each model.
Both start times include the Python, torch and model imports of a new process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

# Run as scripts (python bench/NAME.py): this folder is on sys.path.
from _common import ServerProcess, machine, write_json

from embedwarden.client import Client

MODELS = ("efficientnet_lite0", "efficientnet_lite0_keras")


def start_times(data_dir: Path) -> dict[str, float]:
    shutil.rmtree(data_dir, ignore_errors=True)
    out = {}
    for label in ("cold_start_s", "warm_restart_s"):
        server = ServerProcess(data_dir).start()
        out[label] = server.serving_after
        server.stop()
    return out


def memory(data_dir: Path) -> dict[str, Any]:
    server = ServerProcess(data_dir, "--models", "").start()
    try:
        time.sleep(1.0)
        base = server.rss_bytes()
        per_model: dict[str, float] = {}
        with Client(server.address, timeout=600) as client:
            for name in MODELS:
                before = server.rss_bytes()
                client.load_model(name)
                time.sleep(1.0)
                per_model[name] = (server.rss_bytes() - before) / 2**20
        return {"base_rss_mib": base / 2**20, "per_model_rss_mib": per_model}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("bench/results/startup-data"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {
        "machine": machine(),
        **start_times(args.data_dir / "start"),
        **memory(args.data_dir / "memory"),
    }
    write_json(results, args.json)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
