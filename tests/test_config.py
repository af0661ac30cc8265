import dataclasses
import glob
import subprocess
from pathlib import Path

import pytest
import yaml

from resnet_dist import config, configfile, train
from resnet_dist.config import ConfigError

from .helpers import PY, REPO, call, clean_env, exit_code


def test_defaults_are_the_original_recipe_numbers():
    cfg = config.load(world_size=1)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (0.05, 256, 10)
    assert cfg.run.dir == "runs" and cfg.data.root == "data" and cfg.checkpoint.resume == "auto"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.2\n  epochs: 3\ndata:\n  train_subset: 100\n")
    cfg = config.load(
        str(f), ["train.lr=0.3", "data.train_subset=null", "run.name=1234", "train.momentum=0"], world_size=1
    )
    assert cfg.train.lr == 0.3 and cfg.train.epochs == 3
    assert cfg.data.train_subset is None
    assert cfg.run.name == "1234"  # a job id given as a number is still a name
    assert config.load(None, ["run.name=on", "log.wandb.entity=007"], world_size=1).run.name == "on"
    assert config.load(None, ["log.wandb.entity=007"], world_size=1).log.wandb.entity == "007"
    assert config.load(None, ["run.name=null"], world_size=1).run.name is None
    assert isinstance(cfg.train.momentum, float)


def test_dotted_keys_inside_yaml_and_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train.lr: 0.5\nlog:\n  wandb:\n    mode: offline\n")
    cfg = config.load(str(f), world_size=1)
    assert cfg.train.lr == 0.5 and cfg.log.wandb.mode == "offline"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("nope=1", "'nope'"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.precision=fp8", "train.precision"),
        ("model.stem=vgg", "model.stem"),
        ("data.erasing=1.5", "data.erasing"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=null", "train.lr"),
        ("train=3", "'train'"),
        ("train.lr.x=1", "train.lr"),
        ("justtext", "KEY=VALUE"),
        ("train.nesterov=true", "train.nesterov"),
        ("checkpoint.resume=/no/such/file.pt", "checkpoint.resume"),
        ("data.mirror=/no/such/dir", "data.mirror"),
        ("train.lr=.inf", "finite"),
        ("train.lr=nan", "finite"),
        ("train.momentum=-inf", "finite"),
        ("train.lr=1e-3x", "must be a number"),
        ("run.name=../../x", "run.name"),
        ("run.name=a/b", "run.name"),
        ("run.name=..", "run.name"),
        ("train.batch_size=1", "BatchNorm cannot train on one image"),
        ("data.train_subset=100", "needs 256 training images per rank"),
        ("train.accum_steps=3", "'train.accum_steps' (3) must divide the per-rank batch"),
        ("train.accum_steps=0", "train.accum_steps"),
        ("train.accum_steps=256", "'train.accum_steps' (256) gives 1 image per micro-batch"),
        ("run.deterministic=maybe", "run.deterministic"),
        ("model.sync_bn=2", "model.sync_bn"),
        ("log.profile=20", "log.profile"),
        ("log.profile=20:0", "log.profile"),
        ("dist.debug_delay=0:1", "unknown config key 'dist.debug_delay'"),  # a test hook, no longer a setting
        ("train.cuda_graphs=yes", "train.cuda_graphs"),
        ("dist.backend=mpi", "dist.backend"),
    ],
)
def test_each_bad_value_names_its_key(override, words):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override], world_size=1)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_batch_must_divide_over_world_size():
    config.load(None, ["train.batch_size=96"], world_size=3)
    with pytest.raises(ConfigError, match="divisible by the world size"):
        config.load(None, ["train.batch_size=100"], world_size=3)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(bad), world_size=1)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(str(lst), world_size=1)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.yaml"), world_size=1)


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = config.load(path, world_size=1)
    # round trip: the resolved config written to a run directory loads back to the same values
    assert config.from_dict(yaml.safe_load(configfile.to_yaml(cfg))) == cfg


def test_seed_config_is_the_original_recipe():
    cfg = config.load(str(REPO / "configs" / "seed.yaml"), world_size=1)
    assert cfg.data.resize == 224 and cfg.model.stem == "imagenet" and cfg.model.init == "xavier"
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.batch_size, cfg.train.epochs) == (0.05, 0.0, 256, 10)
    assert cfg.train.schedule == "constant" and not cfg.data.flip and cfg.data.crop_padding == 0


def test_cli_usage_error_exits_2_with_one_line_and_no_run_dir(tmp_path):
    code, _, err = call(train.main, f"run.dir={tmp_path / 'runs'}", "train.precision=fp8")
    assert code == 2
    assert err.strip().count("\n") == 0 and "train.precision" in err
    assert not (tmp_path / "runs").exists()


def test_cli_batch_not_divisible_under_a_launcher_env_exits_2(tmp_path):
    env = dict(WORLD_SIZE=3, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    code, _, err = call(train.main, f"run.dir={tmp_path / 'runs'}", "train.batch_size=256", **env)
    assert code == 2 and "divisible" in err
    assert not (tmp_path / "runs").exists()


def test_print_config_exits_0_without_training(tmp_path):
    code, out, _ = call(train.main, "--print-config", "train.lr=0.2", f"run.dir={tmp_path / 'runs'}")
    assert code == 0
    assert yaml.safe_load(out)["train"]["lr"] == 0.2
    assert not (tmp_path / "runs").exists()
    # every key with its doc beside it, and its allowed values where the doc does not name them
    lines = out.splitlines()
    assert any(x.startswith("  lr: 0.2 ") and x.endswith("# peak learning rate") for x in lines)
    assert any(x.startswith("  cuda_graphs: auto ") and "(auto | on | off)" not in x for x in lines)
    assert any(x.startswith("  grad_compression: none") and "bf16" in x for x in lines)
    assert sum("#" in x for x in lines) == len(config.flat(config.Config().to_dict()))


@pytest.mark.processes
def test_the_entry_points_are_console_scripts_too(tmp_path):
    """pip install makes resnet-dist-train and friends (pyproject.toml [project.scripts]), beside python -m."""
    bin_dir = Path(PY).parent
    names = ("train", "evaluate", "export", "predict", "bench", "plots", "selftest")
    assert all((bin_dir / f"resnet-dist-{n}").is_file() for n in names)
    proc = subprocess.run(
        [bin_dir / "resnet-dist-train", "--print-config", "train.lr=0.3"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["train"]["lr"] == 0.3


def test_help_lists_every_key_with_its_doc(capsys):
    from resnet_dist import train

    code = exit_code(train.main, ["--help"])
    assert code == 0
    out = capsys.readouterr().out
    for key in config.flat(config.Config().to_dict()):
        assert f" {key.rsplit('.', 1)[-1]}: " in out, key
    assert "# deterministic kernels only" in out and "# W&B project" in out


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3),
        ("1E-3", 1e-3),
        (".5", 0.5),
        ("5.", 5.0),
        ("1_000.5", 1000.5),
        ("3", 3.0),
        (" 2e1 ", 20.0),
    ],
)
def test_every_float_spelling_python_takes(text, value, tmp_path):
    assert config.load(None, [f"train.lr={text}"], world_size=1).train.lr == value
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  lr: {text.strip()}\n")  # YAML 1.1 reads 1e-3 as a string
    assert config.load(str(f), world_size=1).train.lr == value


def test_batch_checks_need_the_world():
    with pytest.raises(ConfigError, match="gives 1 image per rank on 4 ranks"):
        config.load(None, ["train.batch_size=4"], world_size=4)
    with pytest.raises(ConfigError, match=r"give each of 2 rank\(s\) 50"):
        config.load(None, ["train.batch_size=128", "data.train_subset=100"], world_size=2)
    config.load(None, ["train.batch_size=100", "data.train_subset=100"], world_size=1)


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("train:\n  lr: 0.2\nmodel:\n  stem: cifar\ntrain:\n  epochs: 3\n", "train", (1, 5)),  # 2nd section
        ("train:\n  lr: 0.2\n  momentum: 0.9\n  lr: 0.3\n", "train.lr", (2, 4)),
        ("train.lr: 0.5\ntrain:\n  lr: 0.1\n", "train.lr", (1, 3)),  # a dotted key and its section
        ("log:\n  wandb:\n    mode: offline\n    mode: online\n", "log.wandb.mode", (3, 4)),
    ],
)
def test_a_key_given_twice_in_a_file_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(f), world_size=1)
    assert (
        str(e.value)
        == f"config file {f}: key '{key}' is given twice (lines {lines[0]} and {lines[1]}): keep one"
    )


def test_yaml_anchors_and_merge_keys_are_not_repeats(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "train: &t\n  lr: 0.2\n  epochs: 3\ncheckpoint:\n  <<: {keep: 5, every_steps: 2}\n  keep: 3\n"
    )
    cfg = config.load(str(f), world_size=1)
    assert (cfg.train.lr, cfg.checkpoint.keep, cfg.checkpoint.every_steps) == (0.2, 3, 2)


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 8, "train:\n  lr: 0.1  # caf\xe9\n".encode("latin-1"), b"\x89PNG\r\n\x1a\n\0\0"],
)
def test_a_config_file_that_is_not_utf8_text_is_one_line_and_exit_2(tmp_path, content, capsys):
    from resnet_dist import train

    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    code = exit_code(train.main, ["--config", str(f), f"run.dir={tmp_path / 'runs'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: config file {f} is not ")
    assert not (tmp_path / "runs").exists()


def test_tilde_is_expanded_in_every_path_key_and_the_config_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mirror").mkdir()
    (tmp_path / "c.pt").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("run:\n  dir: ~/runs\ndata:\n  root: ~/data\n")
    cfg = config.load("~/c.yaml", ["data.mirror=~/mirror", "checkpoint.resume=~/c.pt"], world_size=1)
    paths = (cfg.run.dir, cfg.data.root, cfg.data.mirror, cfg.checkpoint.resume)
    assert paths == tuple(str(tmp_path / p) for p in ("runs", "data", "mirror", "c.pt"))
    assert config.load(None, ["data.root=~"], world_size=1).data.root == str(tmp_path)  # a path, not null
    assert config.load(None, ["checkpoint.resume=never"], world_size=1).checkpoint.resume == "never"
    defaults = config.Config()
    path_keys = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(defaults)
        for f in dataclasses.fields(getattr(defaults, section.name))
        if f.metadata.get("path")
    }
    assert path_keys == {"run.dir", "data.root", "data.mirror", "checkpoint.resume"}
