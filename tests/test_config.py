"""The run config and the options it shares with the CLI: defaults, validation errors that name the
key, relative paths, and that every stage setting is reachable from both with the same default."""

import dataclasses
from pathlib import Path

import pytest
import typer.main

import cli
from distill.errors import DistillError
from distill.options import cli_flag, declared, option, settings_from_table, typer_command, validate
from distill.pipeline.config import SECTIONS, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, '[run]\ndir = "out"\n[train]\nsteps = 7\nlr = 1\n[cache]\ntop_k = 8\n'))
    assert cfg.train.steps == 7
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.cache.top_k == 8
    assert cfg.run.dir == (tmp_path / "out").resolve()
    assert cfg.train.quant == RunConfig().train.quant == "nf4"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nstep = 3\n", "train.step"),
        ("[trian]\nsteps = 3\n", "[trian]"),
        ("[train]\nsteps = 'many'\n", "train.steps"),
        ("[train]\nquant = 'nf3'\n", "train.quant"),
        ("[student]\nquant = 'nf4'\n", "moved: write it as train.quant"),
        ("[cache]\ntop_k = 0\n", "cache.top_k"),
        ("[filter]\nrequire_format = 1\n", "filter.require_format"),
        ("[train]\nkd_weight = 0\nce_weight = 0\n", "train.kd_weight"),
        ("[train]\nstudent = 'x'\n", "train.student"),  # wired by the pipeline, not a key
        ("[train]\nlora_targets = 'q_proj'\n", "train.lora_targets"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(DistillError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_section_hash_tracks_only_named_sections():
    a, b = RunConfig(), RunConfig()
    b.train.steps = 999
    assert a.section_hash("cache", "teacher") == b.section_hash("cache", "teacher")
    assert a.section_hash("train") != b.section_hash("train")
    b.train.student = "wired/by/the/pipeline"  # not a key: does not change what a finished stage depends on
    b.train.steps = None
    assert a.section_hash("train") == b.section_hash("train")


def test_cache_values_default_to_fp16():
    assert RunConfig().cache.dtype == "fp16"
    from teachers.cache_settings import CacheBuildConfig

    assert CacheBuildConfig.__dataclass_fields__["dtype"].default == "fp16"


def test_keys_once_missing_from_a_config_file_are_settable(tmp_path):
    """jsd_beta and loss_chunk_size could not be set from a config file; lists and tables can."""
    cfg = load_config(write(tmp_path, "[train]\njsd_beta = 0.25\nloss_chunk_size = 128\nlora_targets = ['q_proj']\n"
                                      "[data]\nfields = {question = 'problem'}\n"))
    assert (cfg.train.jsd_beta, cfg.train.loss_chunk_size, cfg.train.lora_targets) == (0.25, 128, ["q_proj"])
    assert cfg.data.fields == {"question": "problem"}


def test_train_temperature_defaults_to_the_caches_and_a_mismatch_needs_a_tail_rule(tmp_path):
    cfg = load_config(write(tmp_path, "[cache]\ntemperature = 2.0\n"))
    assert cfg.train.temperature is None and cfg.train.retemper_tail is None  # None: the cache's
    assert load_config(write(tmp_path, "[cache]\ntemperature = 2.0\n[train]\ntemperature = 2\n")).train.temperature == 2.0
    with pytest.raises(DistillError) as err:
        load_config(write(tmp_path, "[cache]\ntemperature = 1.0\n[train]\ntemperature = 2.0\n"))
    assert "train.temperature" in str(err.value) and "retemper_tail" in str(err.value) and "\n" not in str(err.value)
    ok = load_config(write(tmp_path, "[train]\ntemperature = 2.0\nretemper_tail = 'bucket'\n"))
    assert ok.train.retemper_tail == "bucket"
    for text, key in (("[train]\ntemperature = -1.0\n", "train.temperature"),
                      ("[train]\ntemperature = 0.0\n", "train.temperature"),
                      ("[train]\ntemperature = 2.0\nretemper_tail = 'flat'\n", "train.retemper_tail")):
        with pytest.raises(DistillError, match=key.replace(".", r"\.")):
            load_config(write(tmp_path, text))


def test_one_declaration_gives_the_cli_and_the_config_the_same_check(tmp_path):
    """The temperature bound is declared once on TrainConfig: the CLI says --temperature, the config
    says train.temperature, with the same rule."""
    from students.train import TrainConfig

    cfg = TrainConfig(student="s", cache="c", out=Path("o"), temperature=-1.0)
    with pytest.raises(DistillError, match=r"^--temperature must be positive, got -1\.0$"):
        validate(cfg)
    with pytest.raises(DistillError, match=r"^train\.temperature must be positive, got -1\.0$"):
        load_config(write(tmp_path, "[train]\ntemperature = -1.0\n"))


# ------------------------------------------------------------------------------------------ reachability


def _click_params(path: list[str]):
    group = typer.main.get_command(cli.app)
    command = group
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params}


# (stage settings class, the CLI command that takes them, its config section)
STAGES = [
    ("generate", ["teacher", "generate"]),
    ("filter", ["teacher", "filter"]),
    ("cache", ["cache", "build"]),
    ("student", ["student", "init"]),
    ("train", ["train"]),
    ("export", ["export"]),
    ("bench", ["bench"]),
]


def _cli_default(d, param):
    """What the CLI hands the dataclass when the option is not given."""
    from distill.options import _kind

    kind = _kind(d.type)
    if kind == "list" and d.spec.sep:
        return [v for v in (param.default or "").split(d.spec.sep) if v] or None
    if kind in ("list", "dict"):
        return d.default if not param.default else param.default
    return param.default


@pytest.mark.parametrize("section, command", STAGES, ids=[s for s, _ in STAGES])
def test_every_stage_setting_is_reachable_from_the_cli_and_the_config_with_the_same_default(section, command):
    spec = SECTIONS[section]
    stage_cls = spec.stage
    params = _click_params(command)
    section_defaults = {d.name: d for d in declared(spec.cls)}
    keys = set(settings_keys := [d.name for d in declared(spec.cls) if d.spec.in_config and d.name not in spec.wired])
    for d in declared(stage_cls):
        if d.spec.cli:
            assert d.name in params, f"{section}.{d.name} has no CLI option"
            if not d.required:
                assert _cli_default(d, params[d.name]) == d.default, f"{cli_flag(d)}: CLI default differs"
            else:
                assert params[d.name].required, f"{cli_flag(d)} should be required"
        else:
            assert d.spec.reason, f"{section}.{d.name} is not on the CLI and says no reason"
        if d.name in spec.wired:
            assert spec.wired[d.name], f"{section}.{d.name} is wired without saying from where"
            continue
        if not d.spec.in_config:
            assert d.spec.reason, f"{section}.{d.name} is not a config key and says no reason"
            continue
        assert d.name in keys, f"{section}.{d.name} is neither a config key nor wired by the pipeline"
        if d.name in spec.overrides:
            continue
        assert section_defaults[d.name].default == d.default, f"{section}.{d.name}: config default differs from the CLI's"
    # and the reverse: every key of the section is a stage setting or a documented pipeline-only one
    stage_fields = {d.name for d in declared(stage_cls)}
    extra = [k for k in settings_keys if k not in stage_fields]
    assert all(section_defaults[k].spec.help for k in extra)
    assert set(spec.wired) <= stage_fields, "a wired field that the stage does not have"


def test_generated_command_shows_help_and_defaults_and_takes_list_forms():
    @dataclasses.dataclass
    class Demo:
        out: Path = option(help="Where to write.")
        size: int = option(3, "How many.", minimum=1)
        names: list[str] | None = option(None, "Names.", sep=",")
        fields: dict[str, str] | None = option(None, "Columns.", choices=("a", "b"), flag="--field")
        loud: bool = option(True, "Shout.")

    seen = []
    app = typer.Typer()
    app.command()(typer_command(Demo, seen.append))
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "How many." in result.output and "[default: 3]" in result.output and "--no-loud" in result.output
    result = runner.invoke(app, ["--out", "x", "--names", "p, q", "--field", "a=col", "--no-loud"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == Demo(out=Path("x"), size=3, names=["p", "q"], fields={"a": "col"}, loud=False)
    result = runner.invoke(app, ["--out", "x", "--size", "0"])
    assert isinstance(result.exception, DistillError) and str(result.exception) == "--size must be at least 1, got 0"
    result = runner.invoke(app, ["--out", "x", "--field", "c=col"])
    assert isinstance(result.exception, DistillError) and "FIELD must be one of a, b" in str(result.exception)
    with pytest.raises(DistillError, match=r"unknown config key 'demo.out'"):
        settings_from_table(Demo, {"out": "x"}, "demo", exclude=("out",))
    assert settings_from_table(Demo, {"names": ["p"]}, "demo").names == ["p"]


def test_tail_rules_match_the_loss():
    from distill.losses import TAIL_RULES
    from students.train import TAIL_RULES as DECLARED

    assert DECLARED == TAIL_RULES


def test_teacher_generate_reads_the_training_split_by_default():
    assert _click_params(["teacher", "generate"])["split"].default == "train"


def _commands(command, path=()):
    if hasattr(command, "commands"):  # a group (typer ships its own click classes)
        for name, sub in command.commands.items():
            yield from _commands(sub, path + (name,))
    else:
        yield " ".join(path), command


def test_cli_conventions_hold_for_every_command():
    """`--out` is a path everywhere, progress is `--progress/--no-progress` everywhere, no command
    names a run folder `--run-dir`, and `--field` always maps FIELD=COLUMN."""
    import typing

    seen_out = 0
    for name, command in _commands(typer.main.get_command(cli.app)):
        for p in command.params:
            flags = set(p.opts) | set(p.secondary_opts)
            if "--out" in flags:
                seen_out += 1
                annotation = p.type_descriptor.annotation
                assert Path in (annotation, *typing.get_args(annotation)), f"distill {name} --out is not a path"
            if p.name == "progress":
                assert p.opts == ["--progress"] and p.secondary_opts == ["--no-progress"], name
            assert "--run-dir" not in flags and "--no-progress" not in p.opts, name
            if "--field" in flags:
                assert p.multiple and "FIELD=COLUMN" in (p.metavar or ""), name
    assert seen_out >= 9


def test_paths_resolve_against_the_config_folder_and_empty_means_unset(tmp_path):
    cfg = load_config(write(tmp_path, "[teacher]\ngguf = 'models/t.gguf'\n[data]\npath = ''\n"))
    assert cfg.teacher.gguf == (tmp_path / "models" / "t.gguf").resolve() and cfg.data.path is None
    with pytest.raises(DistillError, match="config key 'run.dir' must be a path"):
        load_config(write(tmp_path, "[run]\ndir = ''\n"))
