"""Config base: strict fields, dotted overrides, errors that name file, field and value."""

from __future__ import annotations

import pytest
from pydantic import Field

from cluster.config.base import StrictModel, load_config, parse_overrides
from cluster.errors import ConfigError


class Inner(StrictModel):
    n_layers: int = Field(2, ge=1, description="layers")
    lr: float = Field(1e-3, gt=0, description="learning rate")


class Outer(StrictModel):
    name: str = Field("x", description="name")
    model: Inner = Field(default_factory=Inner, description="inner")


def test_overrides_parse_types():
    assert parse_overrides(["model.n_layers=4", "name=abc", "model.lr=2e-4"]) == {
        "model": {"n_layers": 4, "lr": 2e-4},
        "name": "abc",
    }


def test_load_with_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\nmodel:\n  n_layers: 3\n")
    cfg = load_config(f, Outer, ["model.n_layers=5"])
    assert cfg.name == "a" and cfg.model.n_layers == 5 and cfg.model.lr == 1e-3


def test_unknown_field_names_file_and_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown field 'model\.n_layer'"):
        load_config(f, Outer)


def test_wrong_type_quotes_value(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layers: many\n")
    with pytest.raises(ConfigError, match=r"model\.n_layers: .*got 'many'"):
        load_config(f, Outer)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["model.n_layers"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml", Outer)


def test_invalid_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, Outer)


def test_every_field_of_every_schema_is_described():
    from cluster.config.kinds import KINDS, schema_for
    from cluster.config.model import ModelConfig
    from cluster.config.registry import RegistryConfig

    seen = []
    schemas = [ModelConfig, RegistryConfig]
    for kind in KINDS:
        try:
            cls = schema_for(kind)
        except ConfigError:
            continue  # kind not in this build
        schemas.append(cls)
    for cls in schemas:
        stack = [cls]
        while stack:
            model = stack.pop()
            for name, field in model.model_fields.items():
                assert field.description, f"{model.__name__}.{name} has no description"
                ann = field.annotation
                if isinstance(ann, type) and issubclass(ann, StrictModel):
                    stack.append(ann)
            seen.append(model.__name__)
    assert seen
