"""FairBatching: fair, SLO-aware iteration-level batch scheduling for LLM serving.

Layout: ``core`` (request view, envelopes, plans, KV), ``costmodel`` (batch latency model, fitting,
profiles), ``policies`` (fairbatching and baselines), ``serving`` (the step loop every backend runs, and
the single-node simulator), ``workloads`` (synthetic and trace loaders), ``metrics``, ``report`` (plots,
HTML), ``cluster``, ``engine``, ``integrations``, ``runs`` and ``evaluation``, ``cli``.
See docs/architecture.md.
"""

__version__ = "0.1.0"
