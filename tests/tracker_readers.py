"""Reading tracker output back with each library's own reader, for tests/test_loggers*.py.

TensorBoard: `EventAccumulator`; MLflow: `MlflowClient`; W&B: an offline run's `.wandb` file holds wandb's own
protobuf `Record`s (wandb.proto.wandb_internal_pb2) in LevelDB's log framing. wandb 0.31 moved its Python reader
of that framing (wandb.sdk.internal.datastore) into the Go core, so `wandb_records` unwraps the framing (32 KiB
blocks of crc/length/type chunks after a ':W&B' header) and wandb's protobuf classes parse every record.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] over every event file of `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind in (FIRST, MIDDLE):
            pending = (b"" if kind == FIRST else pending) + chunk
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == LAST else chunk)
        pending = b""
        yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)  # wandb-core sends "a/b" as the nested key [a, b]


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """The offline W&B run files under `run_dir`/wandb: run id(s), group, tags, history rows, summary, exit codes."""
    out: dict[str, Any] = {"ids": set(), "group": set(), "tags": [], "history": [], "summary": {}, "exit": [],
                           "config": {}}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["group"].add(r.run.run_group)
                out["tags"] = list(r.run.tags)
                out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
            elif kind == "exit":
                out["exit"].append(r.exit.exit_code)
    return out
