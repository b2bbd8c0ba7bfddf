"""`logger=csv`: plain CSV tables in `<run dir>/csv/`, for spreadsheets and tools without a JSON reader.

metrics.csv has one row per metrics.jsonl row (columns `step`, then every `<split>/<name>` seen so far; a
new column rewrites the file, as Lightning's CSVLogger does), final.csv the final metrics and params.csv
the flattened config with the run's tags (status, git sha, run dir). Files are replaced atomically.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from robustft.loggers.base import RunMeta, Tracker


def _write(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CSVTracker(Tracker):
    module = ""  # the standard library's csv

    def __init__(self) -> None:
        self.folder = Path()
        self.rows: list[dict[str, Any]] = []
        self.final: dict[str, float] = {}
        self.params: dict[str, Any] = {}

    def open(self, meta: RunMeta, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        if state is not None:  # a resumed run: continue the tables of the earlier attempts
            self.rows = _read(folder / "metrics.csv")
            self.final = {r["key"]: r["value"] for r in _read(folder / "final.csv")}
        self.params = {**meta.params, **{f"tag/{k}": v for k, v in meta.tags.items()}}
        self._write_params()
        return {"folder": str(folder)}

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self.rows += [{"step": step, **values} for step, values in rows]
        header = ["step", *dict.fromkeys(k for r in self.rows for k in r if k != "step")]
        _write(self.folder / "metrics.csv", header, self.rows)

    def log_final(self, metrics: dict[str, float]) -> None:
        self.final.update(metrics)
        _write(self.folder / "final.csv", ["key", "value"], [{"key": k, "value": v} for k, v in self.final.items()])

    def close(self, status: str, tags: dict[str, str]) -> None:
        self.params.update({f"tag/{k}": v for k, v in tags.items()})
        self._write_params()

    def _write_params(self) -> None:
        _write(self.folder / "params.csv", ["key", "value"], [{"key": k, "value": v} for k, v in self.params.items()])
