"""Tests for the generic typed-dataclass config loader (paretoq_jax.config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from paretoq_jax.config import (
    ConfigError,
    from_dict,
    load_config,
    moved_keys,
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


@dataclasses.dataclass
class Section:
    lr: float = 1e-3
    clip: float = 1.0


@dataclasses.dataclass
class Flag:
    on: bool = False


@dataclasses.dataclass
class Moved:
    MOVED_KEYS: ClassVar[dict[str, str]] = {"lr": "opt.lr", "clip": "opt.clip", "flag": "flag.on"}

    steps: int = 1
    opt: Section = dataclasses.field(default_factory=Section)
    flag: Flag = dataclasses.field(default_factory=Flag)


def test_moved_keys_are_rejected_naming_the_new_key():
    with pytest.raises(ConfigError, match="'lr' moved to 'opt.lr'"):
        from_dict(Moved, {"lr": 0.5})
    # a key that became a section, given its old plain value
    with pytest.raises(ConfigError, match="'flag' moved to 'flag.on'"):
        from_dict(Moved, {"flag": True})
    assert from_dict(Moved, {"flag": {"on": True}}).flag.on is True
    with pytest.raises(ConfigError, match="'lr' moved to 'opt.lr'; 'clip' moved to 'opt.clip'"):
        from_dict(Moved, {"lr": 0.5, "clip": 2.0})  # all of them in one message
    assert moved_keys(Moved) == {"lr": "opt.lr", "clip": "opt.clip", "flag": "flag.on"}


def test_stored_configs_are_migrated_with_one_notice(tmp_path, capsys):
    f = tmp_path / "old.yaml"
    f.write_text("steps: 3\nlr: 0.5\nflag: true\nopt: {clip: 2.0}\n")
    with pytest.raises(ConfigError, match="moved to"):
        load_config(Moved, f)
    cfg = load_config(Moved, f, stored=True)
    assert cfg == Moved(steps=3, opt=Section(lr=0.5, clip=2.0), flag=Flag(on=True))
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "lr -> opt.lr" in err and "flag -> flag.on" in err
    # a file in the current layout loads without a notice
    again = load_config(Moved, save_config(cfg, tmp_path / "new.yaml"), stored=True)
    assert again == cfg and capsys.readouterr().err == ""


# TrainConfig's keys before the optimizer / distill / logging sections, and where they went.
OLD_TRAIN_KEYS = {
    **{k: f"optimizer.{k}" for k in ("lr", "schedule", "warmup_steps", "min_lr_ratio",
                                     "weight_decay", "b1", "b2", "eps", "grad_clip",
                                     "scale_lr", "scale_schedule")},
    "distill": "distill.logits",
    "distill_layers": "distill.layers",
    **{k: f"logging.{k}" for k in ("log_every", "eval_every", "quant_stats_every",
                                   "tensorboard")},
}  # fmt: skip
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("old, new", sorted(OLD_TRAIN_KEYS.items()))
def test_old_train_keys_name_the_new_ones(old, new):
    from paretoq_jax.run.config import RunConfig

    value = {"schedule": "constant", "scale_schedule": "constant"}.get(old, "1")
    with pytest.raises(ConfigError, match=f"'train.{old}' moved to 'train.{new}'"):
        load_config(RunConfig, TINY, [f"train.{old}={value}"])
    assert f"train.{new}" in valid_keys(RunConfig)


def test_a_run_config_saved_before_the_sections_still_loads(tmp_path, capsys):
    """A run directory's config.yaml written with the flat train keys (as results.json records
    hold them) loads as the same config in the sections."""
    import yaml

    from paretoq_jax.run.config import RunConfig

    cfg = load_config(
        RunConfig, TINY, ["train.distill.layers=0.5", "train.optimizer.scale_lr=0.01"]
    )
    data = to_dict(cfg)
    flat = {k: v for k, v in data["train"].items() if k not in ("optimizer", "distill", "logging")}
    flat.update(data["train"]["optimizer"], distill=False, distill_layers=0.5,
                **data["train"]["logging"])  # fmt: skip
    old = dict(data, train=flat)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_config(RunConfig, tmp_path / "config.yaml", stored=True) == cfg
    assert capsys.readouterr().err.count("note:") == 1
