"""Running many specs: in parallel on local cores or on a Ray cluster, cached on disk by spec hash.

A rerun of the same sweep reads finished specs from the cache, so an interrupted sweep resumes where it
stopped, and a capacity search never simulates the same point twice. GPU-backend specs run on the engines
the sweeper is given (one replay per engine at a time), each cached as soon as it ends: a GPU search cut
short resumes without replaying what it measured.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import fields
from pathlib import Path
from typing import Any

from fairbatching.core.backend import Backend
from fairbatching.errors import ConfigError, install_hint
from fairbatching.metrics.summary import OPTIONAL, Summary
from fairbatching.runs import Engines, RunResult, RunSpec, run_for_cache, run_on_engines
from fairbatching.validate import atomic_write_text
from fairbatching.workloads.families import family

# runs done (a GPU replay under way counts by the share of its requests that ended), runs in all
Progress = Callable[[float, int], None]
RAY_PROBE_TIMEOUT_S = 5.0  # a live cluster's head answers a TCP connect at once
# Fields every cached summary has (the hit rate only where prefixes were cached, classes only with several).
SUMMARY_FIELDS = {f.name for f in fields(Summary)} - {"per_request", *OPTIONAL}


class Sweeper:
    def __init__(
        self,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        ray_address: str | None = None,
        engines: Engines = None,
    ):
        self.cache_dir = Path(cache_dir) if cache_dir else None  # created with the first result it holds
        self.workers = workers or os.cpu_count() or 1
        if ray_address is not None:
            check_ray_address(ray_address)
        self.ray_address = ray_address
        self.engines = engines  # the GPU backend's (engine.cluster.EngineCluster), started by the caller
        self._ray = None

    def _cached(self, spec: RunSpec) -> dict[str, Any] | None:
        if not self.cache_dir:
            return None
        key = spec.key()
        path = self.cache_dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None  # unreadable (cut short, edited, binary): run it again
        return entry if _valid_entry(entry, key) else None

    def _store(self, result: dict[str, Any]) -> None:
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.cache_dir / f"{result['key']}.json", json.dumps(result) + "\n")

    def run(self, specs: Iterable[RunSpec], progress: Progress | None = None) -> list[RunResult]:
        """Results in the order of ``specs`` (duplicates run once), summaries only: a fresh result and the
        same result read back from the cache are identical."""
        specs = list(specs)
        for name in sorted({s.workload for s in specs}):  # a bad trace fails here, not inside a worker
            family(name).check(max(s.num_requests for s in specs if s.workload == name))
        results: dict[str, dict[str, Any]] = {}
        todo: dict[str, RunSpec] = {}
        for s in specs:
            hit = self._cached(s)
            if hit is not None:
                results[s.key()] = hit
            else:
                todo[s.key()] = s
        total = len({s.key() for s in specs})
        done = len(results)
        under_way: dict[str, float] = {}  # GPU replays running: the share of their requests that ended

        def report() -> None:
            if progress:
                progress(done + sum(under_way.values()), total)

        def landed(result: dict[str, Any]) -> None:
            nonlocal done
            self._store(result)
            results[result["key"]] = result
            under_way.pop(result["key"], None)
            done += 1
            report()

        report()
        for result in self._execute([s for s in todo.values() if s.backend is Backend.SIM]):
            landed(result)
        on_engines = [s for s in todo.values() if s.backend is not Backend.SIM]

        def replaying(i: int, ended: int, of: int) -> None:  # a replay takes minutes: its share moves the ETA
            under_way[on_engines[i].key()] = ended / max(of, 1)
            report()

        if on_engines:
            run_on_engines(on_engines, self.engines, replaying, lambda r: landed(r.to_json()))
        return [RunResult.from_json(s, results[s.key()]) for s in specs]

    def _execute(self, specs: list[RunSpec]) -> Iterable[dict[str, Any]]:
        if not specs:
            return
        if self.ray_address:
            yield from self._execute_ray(specs)
        elif self.workers == 1 or len(specs) == 1:
            for s in specs:
                yield run_for_cache(s)
        else:
            pool = ProcessPoolExecutor(max_workers=min(self.workers, len(specs)))
            try:
                futures = [pool.submit(run_for_cache, s) for s in specs]
                for f in as_completed(futures):
                    yield f.result()
            except BaseException:
                # On Ctrl-C or a failed spec, stop now: queued specs are cancelled and running workers ended,
                # instead of finishing the whole sweep before the interruption is reported.
                workers = list((getattr(pool, "_processes", None) or {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in workers:
                    proc.terminate()
                raise
            pool.shutdown()

    def _execute_ray(self, specs: list[RunSpec]) -> Iterable[dict[str, Any]]:
        try:
            import ray
        except ImportError:
            raise ConfigError(f"--ray needs Ray: {install_hint('ray')}") from None
        if not ray.is_initialized():
            if self.ray_address == "local":
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.ray_address, log_to_driver=False)
        remote = ray.remote(run_for_cache)
        pending = [remote.remote(s) for s in specs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])


def check_ray_address(address: str) -> None:
    """Refuse a cluster address nothing answers at, before any run: ``ray.init`` retries one for minutes, and a
    sweep whose results are all cached would never try it."""
    if address in ("local", "auto"):  # auto: a cluster started on this machine (Ray says so if there is none)
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (host and sep and port.isdigit()):
        raise ConfigError(f"--ray {address!r}: give local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()  # [IPv6]
    except OSError as exc:
        raise ConfigError(f"--ray {address}: nothing answers at {host}:{port} ({exc.strerror or exc})") from None


def _valid_entry(entry: Any, key: str) -> bool:
    """A cache entry is used only if it is a whole result for this key (not ``{}``, not another run's)."""
    return (
        isinstance(entry, dict)
        and entry.get("key") == key
        and isinstance(entry.get("spec"), dict)
        and isinstance(entry.get("summary"), dict)
        and entry["summary"].keys() >= SUMMARY_FIELDS
    )
