"""Serving a gated artifact and load-testing it against the service budgets.

`optimize serve` speaks the Open Inference Protocol (KServe v2, which Triton's HTTP server speaks too) with
dynamic batching, a bounded priority queue that answers 503 + Retry-After instead of letting latency grow,
Prometheus metrics and a SIGTERM drain; `optimize loadtest` drives it open-loop at constant arrival rates
and finds the highest load that keeps p99 and the error rate within the SLO.
"""
