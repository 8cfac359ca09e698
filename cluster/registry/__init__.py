"""The model registry: immutable, verified model versions with aliases, lineage and metrics.

    reg = open_registry(cfg.registry)            # RETORT_REGISTRY > cfg.root > ~/.retort/registry
    ref = reg.publish("student", out_dir, lineage={"parents": ["teacher@production"]}, metrics={...})
    reg.promote(ref.name, ref.version, "production")
    path = reg.resolve("student@production")     # every sha256 checked before it is returned

Layouts and the atomicity argument: ``backend.py`` (local folders), ``remote.py`` (object stores).
"""

from cluster.registry.manifest import IntegrityError
from cluster.registry.refs import ModelRef, RefError, parse_ref
from cluster.registry.registry import Registry, open_registry

__all__ = ["IntegrityError", "ModelRef", "RefError", "Registry", "open_registry", "parse_ref"]
