"""Config: presets resolve, overrides apply, bad keys and values are rejected with a clear message."""
import json

import pytest

from mamlpp.cli import main
from mamlpp.config import Config, ConfigError, apply_overrides
from mamlpp.presets import ALGORITHMS, PRESETS, get_preset


def test_every_preset_resolves_and_round_trips():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.name == name
        assert Config.from_dict(json.loads(cfg.to_json())) == cfg


def test_algorithm_halves_switch_one_fix_each():
    base = get_preset("omniglot-20w1s-maml")
    fixes = {"maml+msl": ("outer", "msl", True), "maml+lslr": ("inner", "lr_mode", "lslr"),
             "maml+bn": ("model", "bnwb", True), "maml+ca": ("outer", "ca", True),
             "maml+da": ("inner", "da_epochs", 50)}
    for algo, (section, key, value) in fixes.items():
        cfg = get_preset(f"omniglot-20w1s-{algo}")
        assert getattr(getattr(cfg, section), key) == value
        changed = [f"{s}.{k}" for s in ("model", "inner", "outer") for k, v in vars(getattr(cfg, s)).items()
                   if getattr(getattr(base, s), k) != v]
        allowed = {f"{section}.{key}"} | ({"model.bnrs"} if algo == "maml+bn" else set())
        assert set(changed) == allowed, algo
    pp = get_preset("omniglot-20w1s-mamlpp")
    assert (pp.outer.msl, pp.inner.lr_mode, pp.model.bnwb, pp.model.bnrs, pp.outer.ca) == (True, "lslr", True, True, True)
    assert set(ALGORITHMS) >= {"maml", "mamlpp", "maml+msl", "maml+lslr", "maml+bn", "maml+ca", "maml+da"}


def test_overrides_apply_with_types():
    cfg = apply_overrides(get_preset("omniglot-5w1s-mamlpp"),
                          ["inner.steps=3", "eval_steps=7", "outer.lr=0.002", "model.bnwb=false",
                           "outer.grad_clamp=none", "outer.betas=0.9,0.99", "model.bn_eval=running"])
    assert (cfg.inner.steps, cfg.inner.eval_steps, cfg.outer.lr, cfg.model.bnwb) == (3, 7, 0.002, False)
    assert cfg.outer.grad_clamp is None and cfg.outer.betas == (0.9, 0.99)
    assert get_preset("omniglot-5w1s-mamlpp").inner.steps == 5  # presets are not mutated


@pytest.mark.parametrize("override, message", [
    ("inner.stepz=3", "valid keys: data.dataset"),
    ("nosuchkey=1", "valid keys"),
    ("inner.steps=three", "expected int"),
    ("outer.lr=fast", "expected float"),
    ("outer.msl=maybe", "expected a boolean"),
    ("inner.lr_mode=adam", "expected one of fixed, lslr, metasgd"),
    ("lr=0.1", "ambiguous key 'lr': say inner.lr or outer.lr"),
    ("inner.steps=0", "must be >= 1"),
    ("model.bn_eval=running", "set model.bnrs=true"),
    ("steps", "is not KEY=VALUE"),
])
def test_bad_overrides_are_rejected_clearly(override, message):
    cfg = get_preset("omniglot-5w1s-maml")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(cfg, [override])


def test_unknown_preset_suggests_names():
    with pytest.raises(ConfigError, match="Did you mean: omniglot-20w1s-mamlpp"):
        get_preset("omniglot-20w1s-mamlp")


def test_cli_reports_config_errors(capsys):
    assert main(["config", "sinusoid-maml", "inner.steps=x"]) == 2
    assert "inner.steps='x': expected int" in capsys.readouterr().err
    assert main(["presets"]) == 0
    assert "omniglot-20w1s-maml+lslr" in capsys.readouterr().out
