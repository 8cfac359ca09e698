"""Load tests of the OpenAI-compatible endpoint with locust.

``locustfile.py`` is what locust runs (its own process: locust's gevent monkey-patching breaks
ssl in a process that has imported torch or ray); ``workloads.py`` builds prompts, ``sse.py``
measures one streamed response, ``shapes.py`` turns the config's shape into locust stages,
``runner.py`` starts headless locust with a hard time limit, ``report.py`` turns its output into
the summary JSON, the SLO verdict and PNG plots. Nothing here imports torch, ray or the engine.
"""
