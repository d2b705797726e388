"""instantiate_from_config: targets, aliases, and readable errors."""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import (
    LEGACY_TARGETS,
    ConfigError,
    get_obj_from_str,
    instantiate_from_config,
    resolve_target,
)


class Outer(torch.nn.Module):
    """A composing module that builds a sub-config, as LatentDiffusion does."""

    def __init__(self, inner_config, scale: float = 1.0):
        super().__init__()
        self.inner = instantiate_from_config(inner_config)
        self.scale = scale


def test_builds_target_with_params():
    lin = instantiate_from_config(
        {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}}
    )
    assert isinstance(lin, torch.nn.Linear)
    assert lin.weight.shape == (2, 3)


def test_missing_params_means_no_arguments():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)


def test_misspelt_parameter_names_key_path_and_suggestion():
    cfg = OmegaConf.create(
        {"model": {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_featurs": 2}}}
    )
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg.model)
    msg = str(info.value)
    assert msg.startswith("model.params.out_featurs: Linear has no parameter 'out_featurs'")
    assert "did you mean 'out_features'?" in msg


def test_nested_config_error_knows_its_path_for_plain_dicts():
    cfg = {
        "target": f"{__name__}.Outer",
        "params": {
            "inner_config": {
                "target": "torch.nn.Linear",
                "params": {"in_feature": 1, "out_features": 1},
            }
        },
    }
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg)
    assert "<config>.params.inner_config.params.in_feature: Linear has no parameter" in str(
        info.value
    )
    assert "did you mean 'in_features'?" in str(info.value)


def test_nested_config_error_knows_its_path_for_omegaconf():
    cfg = OmegaConf.create(
        {
            "model": {
                "target": f"{__name__}.Outer",
                "params": {
                    "inner_config": {"target": "torch.nn.Linear", "params": {"in_features": 1}}
                },
            }
        }
    )
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg.model)
    assert str(info.value).startswith(
        "model.params.inner_config.params: Linear needs parameter(s) 'out_features'"
    )


def test_unknown_module_and_class_are_readable():
    with pytest.raises(ConfigError, match="cannot import module 'nosuchpkg.mod'"):
        instantiate_from_config({"target": "nosuchpkg.mod.Thing"})
    with pytest.raises(ConfigError, match="did you mean 'Linear'"):
        instantiate_from_config({"target": "torch.nn.Linaer"})


def test_sentinels_and_non_mappings_are_errors():
    with pytest.raises(ConfigError, match="sentinel"):
        instantiate_from_config("__is_first_stage__")
    with pytest.raises(ConfigError, match="expected key 'target'"):
        instantiate_from_config({"params": {}})
    with pytest.raises(ConfigError, match="expected a mapping of constructor arguments"):
        instantiate_from_config({"target": "torch.nn.Identity", "params": [1, 2]})


def test_alias_table_maps_legacy_paths():
    assert (
        resolve_target("ldm.modules.diffusionmodules.openaimodel.UNetModel")
        == "ldm.modules.unet.UNetModel"
    )
    assert resolve_target("torch.nn.Identity") == "torch.nn.Identity"
    assert get_obj_from_str("torch.nn.Identity") is torch.nn.Identity
    # every alias points into our own package
    assert all(v.startswith("ldm.") for v in LEGACY_TARGETS.values())


def test_paths_do_not_leak_between_builds():
    """A config built later never inherits the key path of an earlier, garbage-collected one."""
    for _ in range(50):
        instantiate_from_config(
            {
                "target": f"{__name__}.Outer",
                "params": {"inner_config": {"target": "torch.nn.Identity"}},
            }
        )
    cfg = OmegaConf.create(
        {"model": {"target": "torch.nn.Linear", "params": {"in_features": 3, "out_featurs": 2}}}
    )
    with pytest.raises(ConfigError, match=r"^model\.params\.out_featurs: "):
        instantiate_from_config(cfg.model)


def test_did_you_mean_names_the_closest_candidate_or_nothing():
    from ldm.util import did_you_mean

    assert did_you_mean("hiden", ["hidden", "in_dim"]) == " (did you mean 'hidden'?)"
    assert did_you_mean("max_step", iter(["max_epochs", "max_steps"])) == (
        " (did you mean 'max_steps'?)"
    )  # any iterable; the closest of several near candidates
    assert did_you_mean("zzz", ["hidden", "in_dim"]) == ""  # nothing close: no hint
    assert did_you_mean("x", []) == ""


def test_config_and_trainer_errors_use_the_one_did_you_mean():
    """ldm.config and ldm.trainer_setup have no suggestion helper of their own."""
    import ldm.config
    import ldm.trainer_setup
    from ldm import util

    assert not hasattr(ldm.config, "suggest") and not hasattr(util, "_suggest")
    assert ldm.config.did_you_mean is util.did_you_mean
    assert ldm.trainer_setup.did_you_mean is util.did_you_mean


def test_base_learning_rate_in_params_names_where_it_belongs():
    cfg = OmegaConf.create(
        {"target": "torch.nn.Linear", "params": {"in_features": 1, "out_features": 1}}
    )
    cfg.params.base_learning_rate = 1e-5
    with pytest.raises(ConfigError) as info:
        instantiate_from_config(cfg)
    assert "has no parameter 'base_learning_rate'" in str(info.value)
    assert "it belongs at model.base_learning_rate (beside model.target" in str(info.value)
