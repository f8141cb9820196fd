"""FairBatching: fair, SLO-aware iteration-level batch scheduling for LLM serving.

Layout: ``core`` (request view, envelopes, plans, KV), ``costmodel`` (batch latency model, fitting,
profiles), ``policies`` (fairbatching and baselines), ``sim`` (single-node simulator), ``workloads``
(synthetic and trace loaders), ``metrics``, ``report`` (plots, HTML), ``cli``.
"""

__version__ = "0.1.0"
