"""``retort pipeline``: the whole chain as resumable stages, then a report.

Each stage runs the way a user would run it — a ``retort <stage>`` subprocess that submits a
Ray job (or ``--local``) — so the orchestrator imports neither ``train`` nor ``serve``.
"""
