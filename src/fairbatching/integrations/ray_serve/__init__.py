"""FairBatching on Ray Serve: PAB routing and admission as a Ray Serve request router, simulated (or real)
serving replicas that report their Prefill Admission Budget, an OpenAI-compatible ``/v1/completions``
endpoint, and a trace-replay client. Ray is imported only by the modules that need it (``router``, ``app``):
the client (``bench``) works against any OpenAI-compatible server without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PABRequestRouter", "ServeConfig", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "PABRequestRouter":
        from fairbatching.integrations.ray_serve.router import PABRequestRouter

        return PABRequestRouter
    if name in ("ServeConfig", "build_app"):
        from fairbatching.integrations.ray_serve import app

        return getattr(app, name)
    raise AttributeError(name)
