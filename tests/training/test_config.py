"""The learner's config tree: nested TOML tables, one default per knob, old flat keys refused with
their new place (and still read from saved states), validation kept, no torch import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from common.config import ConfigError, format_config, from_dict, load_config, upgrade_moved
from training.config import LearnerConfig, ModelConfig, StrategyConfig

REPO = Path(__file__).resolve().parents[2]


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_tree_loads_from_nested_toml_tables(tmp_path: Path) -> None:
    path = tmp_path / "robot.toml"
    path.write_text('[learner]\nstrategy = "replay"\nmax_task_samples = 500\n\n'
                    '[learner.training]\nepochs = 3\nlr = 1\nparams = {}\n\n'
                    '[learner.model]\nd = 64\nn_experts = 4\n')
    cfg = load_config(LearnerConfig, path, "learner")
    assert (cfg.strategy, cfg.max_task_samples) == ("replay", 500)
    assert (cfg.training.epochs, cfg.training.lr, cfg.training.max_seconds) == (3, pytest.approx(1.0), 30.0)
    assert isinstance(cfg.training.lr, float)
    assert (cfg.model.d, cfg.model.n_experts, cfg.model.proj_dim) == (64, 4, 128)
    assert '"training": {' in format_config(cfg) and '"model": {' in format_config(cfg)  # the log shows the tree


def test_robot_launch_file_sets_the_training_table() -> None:
    cfg = load_config(LearnerConfig, REPO / "launch" / "robot.toml", "learner")
    assert (cfg.training.max_seconds, cfg.training.device) == (30.0, "cpu")


def test_each_knob_is_defined_and_defaulted_once() -> None:
    learner, model, training = _names(LearnerConfig), _names(ModelConfig), _names(StrategyConfig)
    assert {"model", "training", "strategy"} <= learner
    assert model & training == set()
    # intended: LearnerConfig.modality_dropout is the default of the strategy's hyperparameter that
    # model_overrides turns into ModelConfig.modality_dropout (for ours and its ablations only)
    assert learner & (model | training) == {"modality_dropout"}
    tree = LearnerConfig()
    assert tree.model == ModelConfig() and tree.training == StrategyConfig()
    # the robot learner's values (the drifted ones)
    assert (tree.training.epochs, tree.training.threads, tree.training.max_seconds) == (4, 1, 30.0)


@pytest.mark.parametrize("old", sorted(LearnerConfig.moved))
def test_every_old_flat_key_names_its_new_place(tmp_path: Path, old: str) -> None:
    table, _, key = LearnerConfig.moved[old].partition(".")
    assert key in _names({"model": ModelConfig, "training": StrategyConfig}[table])
    path = tmp_path / "old.toml"
    value = {"params": "{}", "device": '"cpu"', "buffer_dtype": '"int8"'}.get(old, "1")
    path.write_text(f"[learner]\n{old} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(LearnerConfig, path, "learner")
    assert str(info.value) == f"[learner] {old} moved to [learner.{table}] {key}"


def test_old_keys_are_all_named_and_unknown_keys_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text("[learner]\nepochs = 8\nd = 64\n")
    with pytest.raises(ConfigError, match=r"\[learner\] d moved to \[learner.model\] d; "
                                          r"\[learner\] epochs moved to \[learner.training\] epochs"):
        load_config(LearnerConfig, path, "learner")
    path.write_text("[learner.training]\nepochz = 8\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(LearnerConfig, path, "learner")


@pytest.mark.parametrize(("toml", "match"), [
    ("[learner.training]\nepochs = 0\n", "epochs must be > 0"),
    ("[learner.training]\nbatch_size = 0\n", r"\[learner.training\].*StrategyConfig.batch_size must be > 0"),
    ("[learner.training]\nmax_seconds = -1\n", "max_seconds must be >= 0"),
    ('[learner.training]\ndevice = "tpu"\n', "device must be cpu, cuda, cuda:N or auto"),
    ('[learner.training]\nbuffer_dtype = "bf16"\n', "buffer_dtype"),
    ("[learner.model]\ntop_k = 11\n", r"top_k must be <= n_experts=10"),
    ("[learner.model]\nd = 0\n", "ModelConfig.d must be > 0"),
    ("[learner.model]\ntap_dims = {image = [8]}\n", "tap_dims comes from the backbone export"),
    ("[learner]\nmodality_dropout = 1.0\n", "modality_dropout"),
    ("[learner]\nmax_task_samples = 0\n", "max_task_samples"),
    ("[learner.model]\nmodality_dropout = 0.2\n", r"modality_dropout is set by the strategy; use \[learner\]"),
    ("[learner.model]\nadapter = \"moe\"\n", "adapter is set by the strategy"),
])
def test_validation_errors_still_raised(tmp_path: Path, toml: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(LearnerConfig, path, "learner")


def test_unknown_strategy_still_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[learner]\nstrategy = "nope"\n')
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        load_config(LearnerConfig, path, "learner")


def test_a_state_saved_before_the_tree_still_loads() -> None:
    old = {"strategy": "naive", "epochs": 2, "d": 16, "threads": 1, "max_seconds": 0.0, "device": "cpu",
           "params": {}, "modality_dropout": 0.3, "max_task_samples": 100}
    cfg = LearnerConfig.from_saved(old)
    assert (cfg.training.epochs, cfg.training.max_seconds, cfg.model.d, cfg.max_task_samples) == (2, 0.0, 16, 100)
    assert LearnerConfig.from_saved(dataclasses.asdict(cfg)) == cfg  # and a new one round-trips
    with pytest.raises(ConfigError, match="epochs and its new place training.epochs are both set"):
        LearnerConfig.from_saved({"epochs": 2, "training": {"epochs": 3}})


@dataclass(kw_only=True)
class Inner:
    rate: float = 1.0


@dataclass(kw_only=True)
class Outer:
    moved: ClassVar[dict[str, str]] = {"hz": "inner.rate"}
    inner: Inner = field(default_factory=Inner)


def test_moved_is_a_general_mechanism() -> None:
    with pytest.raises(ConfigError, match=r"^hz moved to \[inner\] rate$"):
        from_dict(Outer, {"hz": 5})
    with pytest.raises(ConfigError, match=r"^\[pub\] hz moved to \[pub.inner\] rate$"):
        from_dict(Outer, {"hz": 5}, table="pub")
    assert from_dict(Outer, upgrade_moved(Outer, {"hz": 5})).inner.rate == 5.0


def test_learner_views_fill_tap_dims_and_resolve_the_strategy_without_changing_the_tree() -> None:
    cfg = LearnerConfig(strategy="ours-full", training=StrategyConfig(device="auto", params={"ewc": 2.0}))
    model = cfg.model_config({"image": [4, 8]})
    assert model.tap_dims == {"image": [4, 8]} and model.adapter == "moe"
    assert model.modality_dropout == pytest.approx(0.3)  # LearnerConfig.modality_dropout, via the strategy
    strat = cfg.strategy_config()
    assert strat.device in ("cpu", "cuda") and strat.params == {"ewc": 2.0, "modality_dropout": 0.3}
    assert cfg.model.tap_dims == {} and cfg.training.device == "auto" and cfg.training.params == {"ewc": 2.0}
    naive = LearnerConfig(strategy="naive").model_config({"image": [4]})
    assert (naive.adapter, naive.modality_dropout) == ("none", 0.0)


def test_the_config_tree_imports_no_torch() -> None:
    code = ("import sys, training.config, common.config\n"
            "from training.config import LearnerConfig\n"
            "from common.config import format_config\n"
            "format_config(LearnerConfig())\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
