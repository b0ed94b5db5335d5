"""The trainer's temperature, reported KL, max_length and loss chunk size.

* The training temperature defaults to the cache's; another one is refused in one line unless the user
  names a tail rule (`--retemper-tail`), which then reaches the loss.
* The reported KL (held-out evaluation and the training statistic) is taken at the cache temperature:
  a student identical to the teacher reports ~0 for caches stored at T = 1 and T = 2.
* `max_length` cuts every cached sample and its teacher rows; the loss chunk size defaults to automatic.
"""

from __future__ import annotations

import json

import pytest
import torch

import cli
from conftest import _kd_records
from distill.errors import DistillError
from students.train import TrainConfig, loss_config, read_metrics, train, truncate_sample


@pytest.fixture(scope="module")
def cache_t2(kd_pair, tmp_path_factory):
    """The kd_pair teacher's top-8 cache stored at temperature 2."""
    from teachers.cache_build import build_cache

    teacher, _, _ = kd_pair
    out = tmp_path_factory.mktemp("cache_t2") / "cache"
    build_cache(str(teacher), None, out, top_k=8, temperature=2.0, records=_kd_records(16, seed=1),
                progress=False, log=lambda m: None)
    return out


def _cli(capsys, args):
    capsys.readouterr()
    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _train_args(student, cache, out, *extra):
    return ["train", "--student", str(student), "--cache", str(cache), "--out", str(out), "--quant", "none",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--steps", "1", "--batch-size", "4",
            "--eval-every", "0", "--save-every", "0", "--eval-fraction", "0.2", "--no-progress", *extra]


def test_other_temperature_is_refused_in_one_line_without_a_tail_rule(kd_pair, tmp_path, capsys):
    _, student, cache = kd_pair  # cache stored at T = 1
    out = tmp_path / "run"
    code, _, err = _cli(capsys, _train_args(student, cache, out, "--temperature", "2"))
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--temperature 2" in lines[0] and "--retemper-tail" in lines[0] and "temperature 1" in lines[0]
    assert not out.exists()  # refused before anything is written
    code, _, err = _cli(capsys, _train_args(student, cache, out, "--temperature", "2", "--retemper-tail", "flat"))
    assert code == 1 and "--retemper-tail 'flat'" in err and not out.exists()


def test_default_temperature_is_the_caches_and_a_named_rule_reaches_the_loss(kd_pair, cache_t2, tmp_path, capsys):
    _, student, _ = kd_pair
    code, _, err = _cli(capsys, _train_args(student, cache_t2, tmp_path / "default"))
    assert code == 0, err
    loss = json.loads((tmp_path / "default" / "run.json").read_text())["loss"]
    assert loss["temperature"] == 2.0 and loss["cache_temperature"] == 2.0 and loss["tail_rule"] is None
    assert loss["chunk_size"] is None  # automatic, not a fixed 512 rows
    code, _, err = _cli(capsys, _train_args(student, cache_t2, tmp_path / "bucket", "--temperature", "1",
                                            "--retemper-tail", "bucket"))
    assert code == 0, err
    loss = json.loads((tmp_path / "bucket" / "run.json").read_text())["loss"]
    assert loss["temperature"] == 1.0 and loss["cache_temperature"] == 2.0 and loss["tail_rule"] == "bucket"


def test_loss_config_resolves_temperature_rule_and_chunk_size():
    base = dict(student="s", cache="c", out="o")
    cfg = loss_config(TrainConfig(**base), 262_144, cache_temperature=2.0)
    assert cfg.temperature == 2.0 and cfg.cache_temperature == 2.0
    assert cfg.chunk_size is None and cfg.rows_per_chunk(262_144) == 256  # the documented automatic size
    assert loss_config(TrainConfig(**base, temperature=2.0), 100, cache_temperature=2.0).temperature == 2.0
    with pytest.raises(DistillError, match="--retemper-tail"):
        loss_config(TrainConfig(**base, temperature=2.0), 100, cache_temperature=1.0)
    for rule in ("uniform", "bucket"):
        cfg = loss_config(TrainConfig(**base, temperature=0.5, retemper_tail=rule), 100, cache_temperature=1.0)
        assert cfg.temperature == 0.5 and cfg.tail_rule == rule


def _teacher_as_student(kd_pair, cache, out, **kw) -> list[dict]:
    teacher, _, _ = kd_pair
    cfg = TrainConfig(student=str(teacher), cache=str(cache), out=str(out), quant="none", lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, lr=1e-3, batch_size=8, steps=1, eval_every=1, save_every=0,
                      eval_fraction=0.3, progress=False, warmup_steps=0, **kw)
    train(cfg)
    return read_metrics(out)


@pytest.mark.parametrize("which", ["t1", "t2", "t2-train-at-1"])
def test_teacher_as_student_reports_zero_kl_at_any_cache_temperature(kd_pair, cache_t2, tmp_path, which):
    """The untrained LoRA student (B = 0) IS the teacher: held-out KL at step 0 and the KL statistic of
    the first training step (computed before the update) must be ~0, whatever the cache temperature and
    the training temperature."""
    cache = kd_pair[2] if which == "t1" else cache_t2
    kw = {"temperature": 1.0, "retemper_tail": "uniform"} if which == "t2-train-at-1" else {}
    metrics = _teacher_as_student(kd_pair, cache, tmp_path / which, **kw)
    ev0 = next(m for m in metrics if m["kind"] == "eval" and m["step"] == 0)
    tr1 = next(m for m in metrics if m["kind"] == "train" and m["step"] == 1)
    assert ev0["eval_tokens"] > 0 and tr1["valid_tokens"] > 0
    assert abs(ev0["eval_kl"]) < 1e-3, ev0
    assert abs(tr1["kl"]) < 1e-3, tr1
    assert ev0["eval_top1_agreement"] == 1.0


@pytest.mark.parametrize("which", ["t1", "t2"])
def test_evaluate_on_cache_with_the_teacher_itself(kd_pair, cache_t2, which):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.cache.reader import CacheDataset, CacheReader
    from distill.evaluate import evaluate_on_cache

    teacher, _, t1 = kd_pair
    cache = t1 if which == "t1" else cache_t2
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(teacher)
    data = CacheDataset(CacheReader(cache))
    res = evaluate_on_cache(model, tok, data, batch_size=8)  # temperature from the cache's manifest
    assert res["tokens"] > 0 and abs(res["kl"]) < 1e-3 and res["top1_agreement"] == 1.0
    if which == "t2":  # at the wrong temperature the same student would look far from its own teacher
        assert evaluate_on_cache(model, tok, data, batch_size=8, cache_temperature=1.0)["kl"] > 0.1


def test_truncate_sample_keeps_exactly_the_rows_inside():
    from distill.cache.reader import collate

    ids = torch.arange(10, 20)
    mask = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    positions = torch.nonzero(mask[1:]).flatten()  # 2..8: row t predicts token t+1
    k = 3
    sample = {"input_ids": ids, "loss_mask": mask, "positions": positions,
              "target_ids": torch.arange(len(positions) * k).view(-1, k), "target_logprobs": -torch.rand(len(positions), k)}
    cut = truncate_sample(sample, 6)
    assert cut["input_ids"].tolist() == list(range(10, 16)) and cut["loss_mask"].tolist() == mask[:6].tolist()
    assert cut["positions"].tolist() == [2, 3, 4]  # t + 1 <= 5
    assert torch.equal(cut["target_ids"], sample["target_ids"][:3]) and torch.equal(cut["target_logprobs"], sample["target_logprobs"][:3])
    batch = collate([cut], pad_id=0)
    assert batch["targets"][0].tolist() == [-100, -100, 13, 14, 15, -100]
    assert truncate_sample(sample, 10) is sample and truncate_sample(sample, None) is sample
    no_pos = {k_: v for k_, v in sample.items() if k_ != "positions"}
    assert truncate_sample(no_pos, 6)["positions"].tolist() == [2, 3, 4]


def test_max_length_trains_on_exactly_the_rows_inside(kd_pair, tmp_path):
    """One step over every training sample: the step's trained tokens are the rows of positions
    t < max_length - 1, counted from the cache directly."""
    from distill.cache.reader import CacheReader, split_indices

    _, student, cache = kd_pair
    reader = CacheReader(cache)
    lengths = [int(reader[i]["input_ids"].shape[0]) for i in range(len(reader))]
    max_length = min(lengths) - 3  # every sample is cut, inside its completion
    train_idx, _ = split_indices(len(reader), 0.2, seed=0)
    expected = sum(int((reader[i]["positions"] < max_length - 1).sum()) for i in train_idx)
    full = sum(int(reader[i]["positions"].numel()) for i in train_idx)
    assert 0 < expected < full
    cfg = TrainConfig(student=str(student), cache=str(cache), out=str(tmp_path / "run"), quant="none", lora_r=4,
                      lora_alpha=8, lora_dropout=0.0, batch_size=len(train_idx), steps=1, eval_every=0, save_every=0,
                      eval_fraction=0.2, progress=False, max_length=max_length)
    train(cfg)
    rec = next(m for m in read_metrics(tmp_path / "run") if m["kind"] == "train")
    assert rec["valid_tokens"] == expected
    assert rec["tokens"] == sum(min(lengths[i], max_length) for i in train_idx)
    with pytest.raises(DistillError, match="--max-length"):
        train(TrainConfig(student=str(student), cache=str(cache), out=str(tmp_path / "bad"), max_length=1))
