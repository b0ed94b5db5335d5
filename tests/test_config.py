"""The run config: defaults, validation errors that name the key, relative paths."""

import pytest

from distill.config import RunConfig, load_config
from distill.errors import DistillError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, '[run]\ndir = "out"\n[train]\nsteps = 7\nlr = 1\n[cache]\ntop_k = 8\n'))
    assert cfg.train.steps == 7
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.cache.top_k == 8
    assert cfg.run.dir == str((tmp_path / "out").resolve())
    assert cfg.student.quant == RunConfig().student.quant


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nstep = 3\n", "train.step"),
        ("[trian]\nsteps = 3\n", "[trian]"),
        ("[train]\nsteps = 'many'\n", "train.steps"),
        ("[student]\nquant = 'nf3'\n", "student.quant"),
        ("[cache]\ntop_k = 0\n", "cache.top_k"),
        ("[filter]\nrequire_format = 1\n", "filter.require_format"),
        ("[train]\nkd_weight = 0\nce_weight = 0\n", "train.kd_weight"),
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


def test_cache_values_default_to_fp16():
    assert RunConfig().cache.dtype == "fp16"
    from teachers.cache_build import build_cache
    import inspect

    assert inspect.signature(build_cache).parameters["dtype"].default == "fp16"


def test_train_temperature_defaults_to_the_caches_and_a_mismatch_needs_a_tail_rule(tmp_path):
    cfg = load_config(write(tmp_path, "[cache]\ntemperature = 2.0\n"))
    assert cfg.train.temperature == 0.0 and cfg.train.retemper_tail == ""  # 0: the cache's
    assert load_config(write(tmp_path, "[cache]\ntemperature = 2.0\n[train]\ntemperature = 2\n")).train.temperature == 2.0
    with pytest.raises(DistillError) as err:
        load_config(write(tmp_path, "[cache]\ntemperature = 1.0\n[train]\ntemperature = 2.0\n"))
    assert "train.temperature" in str(err.value) and "retemper_tail" in str(err.value) and "\n" not in str(err.value)
    ok = load_config(write(tmp_path, "[train]\ntemperature = 2.0\nretemper_tail = 'bucket'\n"))
    assert ok.train.retemper_tail == "bucket"
    for text, key in (("[train]\ntemperature = -1.0\n", "train.temperature"),
                      ("[train]\ntemperature = 2.0\nretemper_tail = 'flat'\n", "train.retemper_tail")):
        with pytest.raises(DistillError, match=key.replace(".", r"\.")):
            load_config(write(tmp_path, text))
