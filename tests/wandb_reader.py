"""Read back what a W&B run logged, from its `.wandb` file (no server, no wandb internals beyond the protobuf).

The file is a LevelDB-style log: a 7-byte header (`:W&B` + 3 bytes), then 32 KiB blocks of records, each
with a 7-byte header `<IHB` (crc32, length, type: 1 full, 2 first, 3 middle, 4 last piece); a block tail
shorter than 7 bytes is padding. Each assembled payload is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    out, pos, pieces = [], HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # padding at the end of a block
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:  # zero-filled (preallocated or padded) tail
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pieces = [payload]
        elif kind == FIRST:
            pieces = [payload]
            continue
        elif kind == MIDDLE:
            pieces.append(payload)
            continue
        elif kind == LAST:
            pieces.append(payload)
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos}")
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(b"".join(pieces))
        out.append(rec)
        pieces = []
    return out


@dataclass
class WandbRun:
    """What one `.wandb` file holds: the run id, its config, the history rows by step, the logged artifacts."""

    id: str = ""
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # dicts with "_step" and the logged keys (values decoded)
    artifacts: list = field(default_factory=list)  # dicts: name, type, aliases, metadata, files
    exit_code: int | None = None


def _artifact(rec) -> dict:
    """An artifact record: its files by name, each with its base64 MD5 digest, size and staged local copy."""
    a = rec.artifact
    return {
        "name": a.name,
        "type": a.type,
        "aliases": list(a.aliases),
        "metadata": json.loads(a.metadata) if a.metadata else {},
        "files": {
            e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
            for e in a.manifest.contents
        },
    }


def _put(row: dict, item) -> None:
    """A plain key sets a value; a nested key (a logged dict: an image list, a table) builds the dict back."""
    value = json.loads(item.value_json)
    if not item.nested_key:
        row[item.key] = value
        return
    *parents, last = item.nested_key
    for k in parents:
        row = row.setdefault(k, {})
    row[last] = value


def read_run(path: Path) -> WandbRun:
    run = WandbRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.id = rec.run.run_id
            for item in rec.run.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in rec.config.update:
                _put(run.config, item)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                _put(row, item)
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            run.history.append(row)
        elif kind == "artifact":
            run.artifacts.append(_artifact(rec))
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def wandb_files(run_dir: Path) -> list[Path]:
    """Every `.wandb` file under `run_dir/wandb/`, oldest first (the `latest-run` link is skipped)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("*/run-*.wandb") if not p.parent.is_symlink())
