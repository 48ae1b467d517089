"""Tests for the generic typed-dataclass config loader (paretoq_jax.config)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from paretoq_jax.config import (
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
    valid_keys,
)


@dataclasses.dataclass
class Inner:
    path: str
    bits: float | str = 4
    method: str | None = None
    sizes: tuple[int, ...] = (1, 2)


@dataclasses.dataclass
class Opt:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    clip: bool = True


@dataclasses.dataclass
class Root:
    run_dir: str
    model: Inner
    train: Opt = dataclasses.field(default_factory=Opt)


def test_yaml_plus_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run_dir: /tmp/x\nmodel:\n  path: m\n  bits: 2\ntrain:\n  lr: 2e-5\n")
    cfg = load_config(Root, f, ["train.steps=20", "model.bits=ternary", "model.sizes=[3, 4]"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)  # "2e-5" is a str in YAML
    assert cfg.train.steps == 20
    assert cfg.model.bits == "ternary"
    assert cfg.model.sizes == (3, 4)
    assert cfg.train.schedule == "cosine"


def test_numbers_are_coerced_and_union_keeps_numbers(tmp_path):
    cfg = from_dict(Root, {"run_dir": "r", "model": {"path": "p", "bits": 1.58}})
    assert cfg.model.bits == 1.58
    cfg = from_dict(Root, {"run_dir": "r", "model": {"path": "p"}, "train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float)


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"'train.stpes'.*did you mean 'train.steps'"):
        load_config(Root, None, ["run_dir=r", "model.path=p", "train.stpes=3"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.bits'"):
        from_dict(Root, {"run_dir": "r", "model": {"path": "p", "bit": 2}})


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.steps=abc", "'train.steps' must be an integer"),
        ("train.steps=2.5", "'train.steps' must be an integer"),
        ("train.lr=fast", "'train.lr' must be a number"),
        ("train.schedule=cos", "must be one of 'cosine', 'linear', 'constant'"),
        ("train.clip=maybe", "must be true or false"),
        ("model=3", "is a section"),
    ],
)
def test_bad_values_have_clear_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Root, None, ["run_dir=r", "model.path=p", override])


def test_missing_required_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="'model.path' is required"):
        load_config(Root, None, ["run_dir=r", "model.bits=2"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_save_roundtrip_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: r\nmodel: {path: p, bits: 2}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {bits: 3}\n")
    cfg = load_config(Root, tmp_path / "child.yaml", ["train.lr=0.5"])
    assert cfg.model.path == "p" and cfg.model.bits == 3
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Root, out)
    assert again == cfg
    assert to_dict(again)["model"]["sizes"] == [1, 2]


def test_valid_keys_lists_nested():
    keys = valid_keys(Root)
    assert "train.lr" in keys and "model.path" in keys and "run_dir" in keys
