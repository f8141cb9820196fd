"""Running many specs: in parallel on local cores or on a Ray cluster, cached on disk by spec hash.

A rerun of the same sweep reads finished specs from the cache, so an interrupted sweep resumes where it
stopped, and a capacity search never simulates the same point twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from fairbatching.errors import ConfigError
from fairbatching.evaluation.runspec import RunSpec, run_spec

Progress = Callable[[int, int], None]


class Sweeper:
    def __init__(self, cache_dir: str | Path | None = None, workers: int | None = None, ray_address: str | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.workers = workers or os.cpu_count() or 1
        self.ray_address = ray_address
        self._ray = None

    def _cached(self, spec: RunSpec) -> dict[str, Any] | None:
        if not self.cache_dir:
            return None
        path = self.cache_dir / f"{spec.key()}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a write cut short by an interruption: run it again

    def _store(self, result: dict[str, Any]) -> None:
        if self.cache_dir:
            tmp = self.cache_dir / f"{result['key']}.json.tmp"
            tmp.write_text(json.dumps(result) + "\n")
            tmp.replace(self.cache_dir / f"{result['key']}.json")

    def run(self, specs: Iterable[RunSpec], progress: Progress | None = None) -> list[dict[str, Any]]:
        """Results in the order of ``specs`` (duplicates run once)."""
        specs = list(specs)
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
        if progress:
            progress(done, total)
        for result in self._execute(list(todo.values())):
            self._store(result)
            results[result["key"]] = result
            done += 1
            if progress:
                progress(done, total)
        return [results[s.key()] for s in specs]

    def _execute(self, specs: list[RunSpec]) -> Iterable[dict[str, Any]]:
        if not specs:
            return
        if self.ray_address:
            yield from self._execute_ray(specs)
        elif self.workers == 1 or len(specs) == 1:
            for s in specs:
                yield run_spec(s)
        else:
            with ProcessPoolExecutor(max_workers=min(self.workers, len(specs))) as pool:
                futures = [pool.submit(run_spec, s) for s in specs]
                for f in as_completed(futures):
                    yield f.result()

    def _execute_ray(self, specs: list[RunSpec]) -> Iterable[dict[str, Any]]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'fairbatching[ray]'") from None
        if not ray.is_initialized():
            if self.ray_address == "local":
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.ray_address, log_to_driver=False)
        remote = ray.remote(run_spec)
        pending = [remote.remote(s) for s in specs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
