"""One source per recipe's options: every config field is a flag, a `--config` key and a LightningCLI key; unknown
keys are refused with the nearest valid one; a train YAML's `tags:` tags the stored expert. Parsing only."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from trainers.cli import build_parser, main
from trainers.configs import DistillConfig, FullTrainConfig, RouterTrainConfig, SparseTrainConfig, TrainConfig
from trainers.options import NOT_A_SWITCH, Flag, RecipeOptions, _item, _optional, convert


REALISTIC = {"precision": "bf16-mixed", "strategy": "ddp", "devices": "2"}  # Lightning checks these


def _other_value(config: type, name: str):
    """A valid value of field ``name`` that is not its default."""
    if name in REALISTIC:
        return REALISTIC[name]
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    tp, _ = _optional(typing.get_type_hints(config)[name])
    default = None if f.default is dataclasses.MISSING else f.default
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != default)
    if tp is bool:
        return not default
    if tp is int:
        return (default or 0) + 1
    if tp is float:
        return default / 2 if default else 0.5
    item = _item(tp)
    if item is float:
        return (0.5, 2.0)
    if item is not None:
        return ("aa", "bb")
    return f"{name}-value"


def _flag_argv(options: RecipeOptions, name: str, value) -> list[str]:
    flag = options.flag_names(name)[0]
    spec = options.flags.get(name, Flag())
    if spec.const is not NOT_A_SWITCH:
        assert value == spec.const
        return [flag]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, tuple):
        if spec.repeat:
            return [a for v in value for a in (flag, str(v))]
        return [flag, ",".join(map(str, value))]
    return [flag, str(value)]


# Per recipe: the command, its options, its config classes (by the extra flags that select them), the flags any
# run needs (by the field they set, so a test of that field replaces them), and the command's own reader.
def _train():
    from trainers.cli import train

    kinds = {TrainConfig: [], SparseTrainConfig: ["--kind", "sparse"], FullTrainConfig: ["--kind", "task_vector"]}
    base = {"data": ["--data", "d"], "languages": ["--language", "uk"], "name": ["--name", "x"]}
    return ["train"], train.options(), kinds, base, lambda args: train._read(args)[0]


def _distill():
    from trainers.cli import distill

    return ["distill"], distill.options(), {DistillConfig: []}, {"data": ["--data", "d"]}, \
        lambda args: distill._read(args)[0]


def _router():
    from trainers.cli import router

    base = {"pack": ["--pack", "p.safetensors"], "data": ["--data", "d"], "languages": ["--languages", "uk"],
            "out": ["--out", "r.safetensors"]}
    return ["router", "train"], router.options(), {RouterTrainConfig: []}, base, lambda args: router._read(args)[0]


RECIPES = {"train": _train, "distill": _distill, "router": _router}
# Fields a run cannot set alone: what else it needs, as flags and as --config keys.
COMPANIONS = {("distill", "kind"): (["--teacher", "t"], {"teacher": "t"}),
              ("distill", "path_dropout_on"): (["--path", "lowrank"], {"path": "lowrank"})}
# Fields set through a flag of the command's own (train's --data DIR[:WEIGHT]): argv, expected value.
CUSTOM = {"data": (["--data", "A"], "A"), "extra_data": (["--data", "A", "--data", "B:0.5"], ("B:0.5",)),
          "data_weight": (["--data", "A:2"], 2.0)}


def _cases(kinds):
    """(field, the config class that has it, the flags that select that class), each field once."""
    seen = set()
    for config, selector in kinds.items():
        for f in dataclasses.fields(config):
            if f.name not in seen:
                seen.add(f.name)
                yield f.name, config, selector


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_config_field_is_a_flag_and_a_config_key(recipe, tmp_path):
    command, options, kinds, base, read = RECIPES[recipe]()
    for name, config, selector in _cases(kinds):
        value = _other_value(config, name)
        if (recipe, name) == ("train", "init_from") and config is FullTrainConfig:
            continue  # a fine-tune refuses a warm start
        extra, extra_keys = COMPANIONS.get((recipe, name), ([], {}))
        needed = [a for field, argv in base.items() if field != name for a in argv]
        if recipe == "train" and name in CUSTOM:
            argv, value = CUSTOM[name]
            needed = [a for field, args in base.items() if field != "data" for a in args]
        else:
            argv = _flag_argv(options, name, value)
        cfg = read(build_parser().parse_args([*command, *needed, *selector, *extra, *argv]))
        assert isinstance(cfg, config) and getattr(cfg, name) == value, (recipe, name, argv)

        # The same through a --config file, whose keys are the field names.
        yaml_value = list(value) if isinstance(value, tuple) else value
        if recipe == "train" and name in CUSTOM:
            continue  # the --data flag's own forms; the YAML keys extra_data / data_weight are plain fields below
        keys = {"data": "d", "languages": ["uk"], "name": "x", "pack": ["p.safetensors"], "out": "r.safetensors"}
        keys = {k: v for k, v in keys.items() if k in options.yaml_keys() and k != name}
        keys[name] = yaml_value
        if selector:
            keys["kind"] = selector[1]
        keys.update(extra_keys)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(keys))
        cfg = read(build_parser().parse_args([*command, "--config", str(tmp_path / "c.yaml")]))
        assert getattr(cfg, name) == value, (recipe, name, "yaml")


def test_train_yaml_takes_the_several_corpora_fields(tmp_path):
    from trainers.cli.train import _read

    (tmp_path / "c.yaml").write_text("data: A\nextra_data: ['B:0.5']\ndata_weight: 2\nlanguage: uk\nname: x\n")
    cfg, _ = _read(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert (cfg.data, cfg.extra_data, cfg.data_weight) == ("A", ("B:0.5",), 2.0)


LIGHTNING = {"lightning": ("lightning", TrainConfig), "distill": ("distill lightning", DistillConfig)}


@pytest.mark.parametrize("recipe", list(LIGHTNING))
def test_every_config_field_is_a_lightning_key(recipe, tmp_path, capsys):
    from trainers.lightning_cli import lightning_keys

    command, config = LIGHTNING[recipe]
    fixed = {"kind"} if config is DistillConfig else set()  # the distillation LightningCLI trains CLSR students
    wanted, tree = {}, {}
    for f in dataclasses.fields(config):
        if f.name in fixed:
            continue
        value = _other_value(config, f.name)
        value = list(value) if isinstance(value, tuple) else value
        if f.name in ("teacher", "teachers"):
            value = None if f.name == "teacher" else ["aa"]  # one or the other, not both
        for key in lightning_keys(config).get(f.name, (f"model.{f.name}",)):
            wanted[key] = value
            *parents, leaf = key.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "fit", "--config", str(tmp_path / "all.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in wanted.items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_distill_sets_every_clsr_field_from_flags_and_lightning(capsys):
    from distill.clsr.config import ClsrConfig

    from trainers.cli.distill import _read

    names = {"kind": "path"}
    for f in dataclasses.fields(ClsrConfig):
        own = next(g for g in dataclasses.fields(DistillConfig) if g.name == names.get(f.name, f.name))
        assert own.default == f.default or (f.name == "side" and own.default is None), f.name  # None: clsr both
    cfg, _ = _read(build_parser().parse_args(["distill", "--data", "d", "--gate-dropout", "0.25", "--gate-hidden", "8",
                                              "--path", "lowrank"]))
    clsr = cfg.clsr()
    assert (clsr.gate_dropout, clsr.gate_hidden, clsr.kind, clsr.side) == (0.25, 8, "lowrank", "both")


def test_augmentation_fields_are_the_train_configs():
    from trainers.augment import AugmentConfig

    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(AugmentConfig):
        assert train[f.name] == f.default, f.name


@pytest.mark.parametrize("argv, body, key, near", [
    (["train"], "data: d\nlanguage: uk\nname: x\nrnak: 8\n", "rnak", "rank"),
    (["distill"], "data: d\ngate_dropuot: 0.2\n", "gate_dropuot", "gate_dropout"),
    (["router", "train"], "data: d\nlanguages: [uk]\nhiden: 8\n", "hiden", "hidden"),
    (["lightning", "fit"], "model:\n  languages: [uk]\n  rnak: 8\n", "model.rnak", "model.rank"),
    (["distill", "lightning", "fit"], "model:\n  gate_dropuot: 0.2\n", "model.gate_dropuot", "model.gate_dropout"),
    (["lightning", "fit"], "data:\n  augment:\n    spec_augmnt: true\n", "data.augment.spec_augmnt",
     "data.augment.spec_augment"),
    (["lightning", "fit"], "trainr:\n  max_epochs: 2\n", "trainr", "trainer"),
])
def test_an_unknown_config_key_names_the_file_and_the_nearest_key(argv, body, key, near, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    assert main([*argv, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and f"'{key}'" in err
    assert f"nearest valid key: '{near}'" in err


def test_config_values_are_checked_against_the_field_types(tmp_path):
    from trainers.cli.train import _read

    (tmp_path / "c.yaml").write_text("data: d\nlanguage: uk\nname: x\nrank: eight\n")
    with pytest.raises(ValueError, match=r"c.yaml: rank: expected an integer, got 'eight'"):
        _read(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    (tmp_path / "c.yaml").write_text("data: d\nlanguage: uk\nname: x\nside: sideways\n")
    with pytest.raises(ValueError, match=r"side: expected one of decoder, encoder, both, got 'sideways'"):
        _read(build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")]))
    assert convert("0.9, 1.1", tuple[float, ...], "--speed-perturb") == (0.9, 1.1)


def test_tags_in_a_train_yaml_tag_the_stored_expert(tmp_path, monkeypatch, capsys):
    import trainers.train_lora
    from registry.store import Registry
    from tests.registry.test_store import make_expert

    seen = {}

    def fake_training(cfg):
        seen["cfg"] = cfg
        return make_expert(3), {"best_epoch": 0, "best_val_wer": 0.5, "rank": 0}

    monkeypatch.setattr(trainers.train_lora, "train_lora_expert", fake_training)
    (tmp_path / "c.yaml").write_text(f"data: d\nlanguage: uk\nname: uk-tagged\ntags: [best, v1]\n"
                                     f"run_dir: {tmp_path / 'run'}\nregistry: {tmp_path / 'reg'}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
    assert seen["cfg"].languages == ("uk",)
    registry = Registry(tmp_path / "reg")
    assert set(registry.resolve("uk-tagged@best").tags) == {"best", "v1"}
    # --tag on the command line replaces the file's tags, as every flag overrides the file
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--tag", "prod"]) == 0
    assert "prod" in registry.resolve("uk-tagged@latest").tags


def test_a_field_new_to_a_config_gets_a_flag_without_more_code():
    @dataclasses.dataclass(frozen=True)
    class Grown(RouterTrainConfig):
        temperature: float = 2.0  # softmax temperature of the router

    import argparse

    parser = argparse.ArgumentParser()
    options = RecipeOptions("demo", Grown)
    options.add_rest(parser)
    text = parser.format_help()
    assert "--temperature TEMPERATURE" in text and "softmax temperature of the router (default 2)" in text
    assert options.from_args(parser.parse_args(["--temperature", "3"])) == {"temperature": 3.0}
