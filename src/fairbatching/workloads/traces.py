"""Loaders for public LLM serving traces; each accepts any user file of the same format.

- Azure LLM inference trace 2023 (CSV: TIMESTAMP, ContextTokens, GeneratedTokens; absolute wall clock)
- BurstGPT (CSV: Timestamp [s from start], Model, Request tokens, Response tokens, Total tokens, Log Type)
- Mooncake (JSONL: timestamp [ms from start], input_length, output_length, hash_ids). ``hash_ids`` name the
  prompt's 512-token blocks (equal ids: equal content and prefix); they become the request's ``prefix``
  segments, so prefix caching shares what the trace says is shared. The bundled copies carry them compactly
  as ``shared_hash_ids`` (see ``_mooncake``).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np

from fairbatching.errors import WorkloadError
from fairbatching.workloads.bundled import BUNDLED, bundled_name, resolve_trace
from fairbatching.workloads.spec import RequestSpec, Workload

Segments = tuple[tuple[int, int], ...]
Row = tuple[float, int, int, Segments]
MOONCAKE_BLOCK = 512  # tokens per Mooncake hash id


def _open(path: Path, **kwargs):
    """Text mode, through gzip for ``.gz`` files (the bundled traces ship compressed)."""
    return gzip.open(path, "rt", **kwargs) if path.suffix == ".gz" else path.open(**kwargs)


def _plain(path: Path) -> Path:
    """The name without a ``.gz``: what the format and the request ids go by."""
    return path.with_suffix("") if path.suffix == ".gz" else path


# utf-8-sig: spreadsheet exports start CSVs with a byte-order mark that would otherwise glue onto the first column.
ENCODING = "utf-8-sig"


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Each row with its line in the file (the reader's ``line_num``: counting blank lines and the lines of
    quoted multi-line fields, which the reader passes over; a multi-line row reports its last line)."""
    with _open(path, newline="", encoding=ENCODING) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise WorkloadError(f"{path}: line 1: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
        reader.fieldnames = header
        for row in reader:
            yield reader.line_num, row


def _short(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _int_field(path: Path, line: int, row: dict, key: str, minimum: int) -> int:
    raw = row.get(key)
    try:
        if isinstance(raw, bool):
            raise TypeError
        number = float(raw)  # type: ignore[arg-type]  # anything float() refuses is the error below
    except (TypeError, ValueError, OverflowError):
        raise WorkloadError(f"{path}: line {line}: {key} is not a number: {_short(raw)}") from None
    if not math.isfinite(number) or number != int(number):
        raise WorkloadError(f"{path}: line {line}: {key} must be a whole number of tokens, got {_short(raw)}")
    value = int(number)
    if value < minimum:
        raise WorkloadError(f"{path}: line {line}: {key} must be >= {minimum}, got {value}")
    return value


def _timestamp(path: Path, line: int, key: str, raw: object, scale: float = 1.0) -> float:
    try:
        if isinstance(raw, bool):
            raise TypeError
        ts = float(raw) * scale  # type: ignore[arg-type]  # anything float() refuses is the error below
    except (TypeError, ValueError, OverflowError):
        raise WorkloadError(f"{path}: line {line}: {key} is not a number: {_short(raw)}") from None
    if not math.isfinite(ts):
        raise WorkloadError(f"{path}: line {line}: {key} must be finite, got {raw!r}")
    return ts


def _azure(path: Path, skipped: list[int]) -> Iterator[Row]:
    t0 = None
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        raw = (row.get("TIMESTAMP") or "").strip()
        try:
            ts = datetime.fromisoformat(raw[:26] if "." in raw else raw).timestamp()
        except ValueError:
            raise WorkloadError(f"{path}: line {line}: TIMESTAMP is not a date-time: {raw!r}") from None
        t0 = ts if t0 is None else t0
        yield (
            ts - t0,
            _int_field(path, line, row, "ContextTokens", 1),
            _int_field(path, line, row, "GeneratedTokens", 1),
            (),
        )


def _burstgpt(path: Path, skipped: list[int]) -> Iterator[Row]:
    for line, row in _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens")):
        ts = _timestamp(path, line, "Timestamp", row["Timestamp"])
        prompt = _int_field(path, line, row, "Request tokens", 0)
        output = _int_field(path, line, row, "Response tokens", 0)
        if prompt == 0 or output == 0:
            skipped.append(line)  # BurstGPT logs failed requests with zero tokens; they carry no work to replay.
            continue
        yield ts, prompt, output, ()


def _id_ranges(path: Path, line: int, raw: object) -> list[int]:
    """``"0 46-58"`` -> [0, 46, 47, ..., 58]: the bundled traces' compact hash id lists."""
    if not isinstance(raw, str):
        raise WorkloadError(f"{path}: line {line}: shared_hash_ids must be a string of ids and ranges: {_short(raw)}")
    ids: list[int] = []
    try:
        for part in raw.split():
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise WorkloadError(f"{path}: line {line}: shared_hash_ids is not ids and ranges: {_short(raw)}") from None
    return ids


def _hash_ids(path: Path, line: int, rec: dict, prompt: int, next_id: int) -> list[int]:
    """A row's hash ids: the published ``hash_ids`` list, or the bundled form, where ``shared_hash_ids`` lists
    the ids the request shares with earlier rows (ranges, ``"0 46-58"``) and the rest of its
    ceil(input_length / 512) ids are new, numbered on from the largest id of the rows before it (as the
    release numbers them: every new id is the next one, after the shared ones)."""
    raw = rec.get("hash_ids")
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in raw):
            raise WorkloadError(f"{path}: line {line}: hash_ids must be a list of integers: {_short(raw)}")
        return raw
    if "shared_hash_ids" not in rec:
        return []
    shared = _id_ranges(path, line, rec["shared_hash_ids"])
    fresh = max(0, -(-prompt // MOONCAKE_BLOCK) - len(shared))
    return shared + list(range(next_id, next_id + fresh))


def _segments(ids: list[int], prompt: int) -> Segments:
    """Mooncake hash ids as content segments of the prompt (the last one as long as what is left of it)."""
    segs = []
    left = prompt
    for h in ids:
        if left <= 0:
            break
        segs.append((h, min(MOONCAKE_BLOCK, left)))
        left -= MOONCAKE_BLOCK
    return tuple(segs)


def _mooncake(path: Path, skipped: list[int]) -> Iterator[Row]:
    next_id = 0
    with _open(path, encoding=ENCODING) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}: line {line}: not valid JSON: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise WorkloadError(f"{path}: line {line}: expected a JSON object")
            missing = [k for k in ("timestamp", "input_length", "output_length") if k not in rec]
            if missing:
                raise WorkloadError(f"{path}: line {line}: missing field(s) {', '.join(missing)}")
            ts = _timestamp(path, line, "timestamp", rec["timestamp"], 1e-3)
            prompt = _int_field(path, line, rec, "input_length", 1)
            output = _int_field(path, line, rec, "output_length", 1)
            ids = _hash_ids(path, line, rec, prompt, next_id)
            if ids:
                next_id = max(next_id, max(ids) + 1)
            yield ts, prompt, output, _segments(ids, prompt)


# Each loader yields (arrival s, prompt tokens, output tokens, content segments) and appends the line of every
# row it skips.
TRACE_FORMATS: dict[str, Callable[[Path, list[int]], Iterator[Row]]] = {
    "azure": _azure,
    "burstgpt": _burstgpt,
    "mooncake": _mooncake,
}


def detect_format(path: Path) -> str:
    if _plain(path).suffix in (".jsonl", ".json"):
        return "mooncake"
    with _open(path, encoding=ENCODING) as f:
        header = f.readline()
    if "TIMESTAMP" in header and "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise WorkloadError(
        f"{path}: line 1: cannot tell the trace format from the header {header.strip()!r}; "
        f"pass the format ({', '.join(TRACE_FORMATS)})"
    )


def load_trace(path: str | Path, fmt: str = "auto", limit: int | None = None) -> Workload:
    """Load a trace file or a bundled trace by name; arrivals start at 0 and are sorted (stable, so ties keep
    file order). Rows the format marks as failed requests are skipped and counted in ``meta["skipped_rows"]``.
    """
    path = resolve_trace(path)
    if path.is_dir():
        raise WorkloadError(f"{path}: is a folder, not a trace file")
    if not path.is_file():
        raise WorkloadError(f"{path}: no such trace file, and not a bundled trace ({', '.join(BUNDLED)})")
    if fmt != "auto" and fmt not in TRACE_FORMATS:
        raise WorkloadError(f"unknown trace format {fmt!r}; choose from auto, {', '.join(TRACE_FORMATS)}")
    rows: list[Row] = []
    skipped: list[int] = []
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        for row in TRACE_FORMATS[fmt](path, skipped):
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not a UTF-8 text file (undecodable byte at offset {exc.start})") from None
    except csv.Error as exc:
        raise WorkloadError(f"{path}: not a readable CSV file: {exc}") from None
    except (OSError, EOFError) as exc:  # EOFError: a truncated .gz
        raise WorkloadError(f"{path}: cannot read trace: {getattr(exc, 'strerror', None) or exc}") from None
    if not rows:
        raise WorkloadError(f"{path}: the trace has no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    reqs = tuple(
        RequestSpec(f"{_plain(path).stem}-{i}", t - t0, p, o, prefix=seg) for i, (t, p, o, seg) in enumerate(rows)
    )
    meta = {"kind": "trace", "format": fmt, "path": str(path), "skipped_rows": len(skipped)}
    return Workload(bundled_name(path) or _plain(path).stem, reqs, meta)


def bundled_shapes() -> list[dict]:
    """Every bundled trace with its provenance and shape (loading all four takes well under a second)."""
    return [
        {"name": t.name, "source": t.source, "license": t.license, **trace_shape(load_trace(t.path))}
        for t in BUNDLED.values()
    ]


def trace_shape(workload: Workload) -> dict[str, float]:
    """What a person checks before replaying a trace: size, span, rate, and the spread of lengths."""
    prompts = np.array([r.prompt_len for r in workload.requests])
    outputs = np.array([r.output_len for r in workload.requests])
    shape: dict[str, float] = {
        "requests": len(workload),
        "duration_s": workload.duration,
        "qps": workload.qps,
    }
    for label, values in (("prompt", prompts), ("output", outputs)):
        for q in (50, 90, 99):
            shape[f"{label}_p{q}"] = float(np.percentile(values, q))
    return shape
