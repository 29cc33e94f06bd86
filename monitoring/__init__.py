"""What PMs look at: label accuracy, agreement, the blind audit, likely label errors, drift and throughput.

Downstream of every stage of the loop: it reads the journal, the slice store, the registry and the pool,
and nothing in ``training/``, ``serving/`` or ``active_learning/`` imports it. The CLI and the demo, which
compose the service, mount its routers next to the backend's.
"""
