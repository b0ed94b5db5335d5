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
