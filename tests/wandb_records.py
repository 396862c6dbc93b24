"""Test helper: the records of an offline W&B ``run-<id>.wandb`` file.

wandb 0.31 has no Python reader any more (the old ``wandb.sdk.internal.datastore.DataStore`` is gone;
its Go service, wandb-core, writes and reads the file). The format is unchanged: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then LevelDB-log framing in 32 KiB blocks (per chunk: CRC-32 of
type byte + data, length, type FULL/FIRST/MIDDLE/LAST), each record a serialized
``wandb.proto.wandb_internal_pb2.Record``. The CRC is checked, so a misread fails loudly.

``run.finish()`` returns before wandb-core has written the file out (measured: 7 bytes right after
finish, complete 0.2 s later; complete once the process has exited), so the readers of a finished
run wait for its ``exit`` record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every complete record of the file, in order."""
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log ({data[:7]!r})"
    records, pos, pending = [], 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the writer pads a block tail too short for a chunk header
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if kind == 0 or len(chunk) < length:  # zero padding or a chunk cut off by a kill
            break
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad CRC at byte {pos}"
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: str | Path, timeout_s: float = 20.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run, once wandb-core has written its ``exit`` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout_s} s ({len(records)} records)")
        time.sleep(0.1)


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """The ``history`` records of a finished run as dicts of decoded JSON values (``_step`` included)."""
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config_values(path: str | Path) -> dict[str, Any]:
    """A finished run's config as the file holds it: the run record's config, then every update."""
    config: dict[str, Any] = {}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def run_files(run_dir: str | Path) -> list[Path]:
    """The offline ``run-<id>.wandb`` files under ``<run_dir>/wandb``, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
