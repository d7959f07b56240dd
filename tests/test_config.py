from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from seal.config import Config
from tests.conftest import CONF_DIR, make_cfg

# conf/accelerate/ holds `accelerate launch` configs, not a Hydra group (tests/test_sft.py reads them).
GROUPS = {
    g.name: sorted(p.stem for p in g.glob("*.yaml"))
    for g in Path(CONF_DIR).iterdir()
    if g.is_dir() and g.name != "accelerate"
}


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_into_the_schema(tmp_path, group, option):
    # experiment presets are not in the defaults list: they are added with +experiment=NAME
    cfg = make_cfg(tmp_path, f"{'+' if group == 'experiment' else ''}{group}={option}")
    if group == "model" and option == "hf":
        cfg.model.name_or_path = "org/name"  # the only mandatory value of a group
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config)


def test_default_composition(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.model.name == "smollm2_135m" and cfg.task.name == "knowledge"
    assert cfg.self_edit.name == "implications" and cfg.rl.name == "rest_em"
    assert cfg.adapt.rank == 32 and cfg.adapt.alpha == 64 and cfg.adapt.lr == pytest.approx(1e-3)
    assert list(cfg.task.conditions) == ["base", "passage", "self_edit"]


def test_unknown_key_and_wrong_type_fail_at_start_up(tmp_path):
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "adapt.rnak=8")
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "adapt.rank=eight")
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "model=gpt9")
    cfg = make_cfg(tmp_path)
    with pytest.raises(ConfigAttributeError):
        cfg.adapt.nonexistent = 1
