"""Config base, YAML loading with dotted overrides, and the schema of every job kind.

Schemas live here (in ``cluster``) rather than beside their jobs so that the CLI can
validate a config before it submits anything, without importing torch, DeepSpeed or Ray.
Every schema module imports only pydantic.
"""

from cluster.config.base import StrictModel, load_config, load_yaml, parse_overrides
from cluster.config.kinds import KINDS, schema_for, validate_file

__all__ = [
    "KINDS",
    "StrictModel",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "schema_for",
    "validate_file",
]
