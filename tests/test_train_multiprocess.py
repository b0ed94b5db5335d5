"""Training under N processes: `accelerate launch` on the CPU (2 processes, gloo) against one process.

The same flags must train the same model on any number of processes: step by step the same logged
(global) losses and the same final adapters; checkpoints and metrics written once; a run whose
launcher is SIGKILLed resumes to the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from students.distributed import batch_share, step_share
from students.train import TrainConfig, read_metrics, train

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "launched_train.py"
LAUNCH_TIMEOUT = 900


# ---- who trains on which rows (no processes needed) ------------------------------------------------

def _micro(sizes):
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out, start


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("sizes", [[4], [3], [1], [2, 2], [2, 3, 1], [5, 1, 4, 2, 2]])
def test_step_share_gives_every_row_to_exactly_one_process(sizes, world):
    """The shipped bug: with --grad-accum below the process count every process took micro-batch 0."""
    micro, n = _micro(sizes)
    shares = [step_share(micro, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # as many forwards/backwards everywhere (DDP would hang)
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(n))  # once, none twice


def test_batch_share_splits_held_out_batches_evenly():
    batches, _ = _micro([3, 3, 2])
    shares = [batch_share(batches, rank, 2) for rank in range(2)]
    assert shares == [[batches[0], batches[2]], [batches[1], []]]


# ---- launching ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_leftovers(marker: str) -> list[int]:
    """SIGKILL any process of ours whose command line holds `marker` (a path unique to one test)."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def _launch(args: list[str], marker: str, *, processes: int = 2, timeout: float = LAUNCH_TIMEOUT):
    """`accelerate launch --num_processes N ARGS` on the CPU; (returncode, output). The launcher gets a
    process group of its own, killed with any worker left (found by `marker`) whatever happens."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s:\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_leftovers(marker)
    return proc.returncode, out


def _launch_configs(cfgs: list[TrainConfig], spec_path: Path, **spec) -> tuple[int, str]:
    spec_path.write_text(json.dumps({"configs": [c.to_dict() for c in cfgs], **spec}))
    return _launch([str(DRIVER), str(spec_path)], marker=str(spec_path))


def _cli_args(cfg: TrainConfig) -> list[str]:
    """`-m cli train` (the documented launch form) with flags for the fields these tests set."""
    args = ["-m", "cli", "train", "--student", cfg.student, "--cache", cfg.cache, "--out", cfg.out, "--quant", cfg.quant,
            "--lora-r", str(cfg.lora_r), "--lora-alpha", str(cfg.lora_alpha), "--lora-dropout", str(cfg.lora_dropout),
            "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size), "--grad-accum", str(cfg.grad_accum),
            "--steps", str(cfg.steps), "--eval-every", str(cfg.eval_every), "--save-every", str(cfg.save_every),
            "--eval-fraction", str(cfg.eval_fraction), "--warmup-steps", str(cfg.warmup_steps), "--no-progress"]
    return args + (["--resume"] if cfg.resume else [])


# ---- reading runs ---------------------------------------------------------------------------------

def _records(run_dir: Path, kind: str) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["kind"] == kind]


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _assert_same_training(one: Path, two: Path, *, rel: float = 1e-4, adapter_atol: float = 1e-6,
                          floor: float = 1e-12) -> float:
    """Step by step the same global losses and statistics, the same held-out figures and adapters.
    `floor`: losses are compared relative to at least this (a student cut from its teacher starts at a
    KL of ~1e-6, where float rounding alone is a relative 1e-3). Returns the largest relative difference."""
    r1, r2 = _records(one, "train"), _records(two, "train")
    assert [r["step"] for r in r2] == [r["step"] for r in r1] and len(r1) >= 5
    worst = 0.0
    for a, b in zip(r1, r2):
        assert (b["valid_tokens"], b["tokens"]) == (a["valid_tokens"], a["tokens"])  # every row once, counted once
        for key in ("loss", "kd", "kl"):
            diff = abs(b[key] - a[key]) / max(abs(a[key]), floor)
            assert diff < rel, (key, a["step"], a[key], b[key])
        worst = max(worst, abs(b["loss"] - a["loss"]) / max(abs(a["loss"]), floor))
        assert b["top1_agreement"] == pytest.approx(a["top1_agreement"], abs=1e-9)
    e1, e2 = _records(one, "eval"), _records(two, "eval")
    assert [e["step"] for e in e2] == [e["step"] for e in e1]
    for a, b in zip(e1, e2):
        assert b["eval_tokens"] == a["eval_tokens"] and b["eval_kl"] == pytest.approx(a["eval_kl"], rel=rel, abs=rel * floor)
    w1, w2 = _adapter(one), _adapter(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=adapter_atol)
    assert any(not torch.all(w == 0) for n, w in w1.items() if "lora_B" in n)  # the adapters did train
    return worst


def _assert_written_once(run_dir: Path) -> None:
    keys = [(m["kind"], m["step"]) for m in read_metrics(run_dir)]
    assert len(keys) == len(set(keys)), "a metrics line was written by more than one process"
    assert not list(run_dir.glob(".tmp-*"))
    assert not list(run_dir.glob("checkpoints/.tmp-*"))


# ---- the same model on 1 and 2 processes -------------------------------------------------------

def _cfg(kd_pair, out: Path, **kw) -> TrainConfig:
    _, student, cache = kd_pair
    base = dict(student=str(student), cache=str(cache), out=str(out), quant="none", lora_r=4, lora_alpha=8,
                lora_dropout=0.0, lr=5e-3, steps=5, eval_every=2, save_every=0, eval_fraction=0.2,
                eval_batch_size=3, progress=False, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


# grad_accum 1 with 3 rows: the rows of each micro-batch split 2 + 1; 2: one micro-batch per process;
# 3: micro-batches 0 and 2 on the first process, 1 and an empty one on the second.
SPLITS = {"ga1": dict(batch_size=3, grad_accum=1), "ga2": dict(batch_size=2, grad_accum=2),
          "ga3": dict(batch_size=2, grad_accum=3)}
RESUME = dict(lora_dropout=0.1, steps=8, batch_size=4, save_every=2, eval_every=3, eval_batch_size=8)  # flags the CLI has


# Every codec but the plain top-k of kd_pair: the sampled ones carry per-entry weights and invalid padded
# slots, so their loss sums and token counts must still add up across processes to the one-process loss.
CODEC_CACHES = {"topk-q8-packed": dict(codec="topk", top_k=8, dtype="q8", pack_ids=True),
                "sampled": dict(codec="sampled", samples=8),
                "sampled-q8-packed-tau2": dict(codec="sampled", samples=12, dtype="q8", pack_ids=True,
                                               proposal_temperature=2.0),
                "topk+sampled-q8-packed": dict(codec="topk+sampled", top_k=4, samples=8, dtype="q8", pack_ids=True)}


@pytest.fixture(scope="module")
def codec_caches(kd_pair, tmp_path_factory):
    """kd_pair's teacher cached with each codec of CODEC_CACHES (the same 40 records)."""
    from conftest import _kd_records
    from teachers.cache_build import build_cache

    teacher = kd_pair[0]
    root = tmp_path_factory.mktemp("codec_caches")
    for name, opts in CODEC_CACHES.items():
        build_cache(str(teacher), None, root / name, records=_kd_records(40), progress=False, log=lambda m: None, **opts)
    return {name: root / name for name in CODEC_CACHES}


@pytest.fixture(scope="module")
def two_process_runs(kd_pair, codec_caches, tmp_path_factory):
    """One launch of 2 processes training every SPLITS config, one run per codec of CODEC_CACHES, and the
    uninterrupted reference of the resume test (dropout on, so that each process's RNG matters)."""
    root = tmp_path_factory.mktemp("two_proc")
    cfgs = [_cfg(kd_pair, root / name, **kw) for name, kw in SPLITS.items()]
    cfgs += [_cfg(kd_pair, root / f"codec-{name}", cache=str(cache), **SPLITS["ga1"]) for name, cache in codec_caches.items()]
    cfgs.append(_cfg(kd_pair, root / "resume_ref", **RESUME))
    code, out = _launch_configs(cfgs, root / "spec.json")
    assert code == 0, out[-4000:]
    return root


@pytest.mark.parametrize("name", list(SPLITS))
def test_two_processes_train_the_same_model_as_one(kd_pair, two_process_runs, tmp_path, name):
    one = tmp_path / "one"
    train(_cfg(kd_pair, one, **SPLITS[name]))
    two = two_process_runs / name
    worst = _assert_same_training(one, two)
    print(f"{name}: largest relative loss difference, 2 processes vs 1: {worst:.2e}")
    _assert_written_once(two)
    summary = json.loads((two / "final" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "ddp" and summary["steps"] == 5


@pytest.mark.parametrize("name", list(CODEC_CACHES))
def test_two_processes_train_the_same_model_as_one_on_every_codec(kd_pair, codec_caches, two_process_runs, tmp_path, name):
    """Each process sees a share of every batch's rows; a weighted (sampled) target's loss is a sum over
    valid slots divided by the global count of trained positions, the same on 1 and 2 processes."""
    one = tmp_path / "one"
    train(_cfg(kd_pair, one, cache=str(codec_caches[name]), **SPLITS["ga1"]))
    two = two_process_runs / f"codec-{name}"
    worst = _assert_same_training(one, two)
    print(f"{name}: largest relative loss difference, 2 processes vs 1: {worst:.2e}")
    _assert_written_once(two)
    assert json.loads((two / "run.json").read_text())["cache"]["codec"] == CODEC_CACHES[name]["codec"]


def test_resume_after_sigkill_of_the_launcher(kd_pair, two_process_runs, tmp_path):
    """SIGKILL of the launcher's process group after step 5 (last checkpoint at 4): no worker survives it,
    and `--resume` on 2 processes logs the losses of the uninterrupted 2-process run."""
    run_dir = tmp_path / "killed"
    cfg = _cfg(kd_pair, run_dir, **RESUME)
    code, out = _launch_configs([cfg], tmp_path / "kill-spec.json", kill_at=5)
    assert code == -signal.SIGKILL, out[-3000:]
    # The launch returns once every holder of its output pipe is gone: workers that outlived their
    # launcher would have finished the run by then (they did, before they got a parent-death signal).
    assert not (run_dir / "final").exists(), "workers outlived their launcher"
    assert (run_dir / "checkpoints" / "step-000004" / "rng-rank1.json").is_file()  # each process's RNG saved
    assert max(m["step"] for m in read_metrics(run_dir)) in (5, 6)

    cfg.resume = True
    code, out = _launch(_cli_args(cfg), marker=str(run_dir))
    assert code == 0, out[-4000:]
    ref = two_process_runs / "resume_ref"
    got, want = _records(run_dir, "train"), _records(ref, "train")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(want, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-9), b["step"]
    assert [(e["step"], e["eval_kl"]) for e in _records(run_dir, "eval")] == \
        [(e["step"], pytest.approx(e["eval_kl"], rel=1e-6)) for e in _records(ref, "eval")]
    for name, value in _adapter(ref).items():
        torch.testing.assert_close(_adapter(run_dir)[name], value, rtol=1e-5, atol=1e-7)
    _assert_written_once(run_dir)


# ---- a real student: NF4 SmolLM2 -------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_train_nf4_smollm2_as_one(smollm2_dir, tmp_path):
    from teachers.cache_build import build_cache

    records = [{"prompt": f"What is {a} + {b}?", "completion": f" {a} + {b} = {a + b}."}
               for a, b in [(3, 4), (12, 7), (25, 30), (8, 9), (41, 2), (6, 6), (19, 23), (50, 11), (7, 35), (14, 14)]]
    cache = tmp_path / "cache"
    build_cache(str(smollm2_dir), None, cache, top_k=8, records=records, max_length=48, progress=False, log=lambda m: None)
    base = dict(student=str(smollm2_dir), cache=str(cache), quant="nf4", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                lr=1e-3, steps=5, eval_every=0, save_every=0, eval_fraction=0.2, progress=False, warmup_steps=1,
                gradient_checkpointing=False)
    splits = {"ga1": dict(batch_size=2, grad_accum=1), "ga2": dict(batch_size=1, grad_accum=2)}
    cfgs = [TrainConfig(out=str(tmp_path / f"two-{n}"), **base, **kw) for n, kw in splits.items()]
    code, out = _launch_configs(cfgs, tmp_path / "spec.json")
    assert code == 0, out[-4000:]
    for name, kw in splits.items():
        train(TrainConfig(out=str(tmp_path / f"one-{name}"), **base, **kw))
        # Adam divides by sqrt(v): where a gradient is at rounding level, rounding changes its update by a
        # fraction of lr (seen: 1 of 2,304 values off by 9e-6 = 0.009 lr); the losses agree to ~1e-7.
        worst = _assert_same_training(tmp_path / f"one-{name}", tmp_path / f"two-{name}", adapter_atol=0.02 * base["lr"])
        print(f"NF4 SmolLM2 {name}: largest relative loss difference, 2 processes vs 1: {worst:.2e}")


# ---- the student FSDP / DeepSpeed would shard (loads and trains on the CPU; the engines need a GPU) ----

@pytest.mark.parametrize("checkpoint_layers", ["all", "lean"])
def test_nf4_student_stored_in_a_float_dtype_computes_the_same(kd_pair, checkpoint_layers):
    """FSDP shards only float tensors: NF4 codes packed into bf16 (`bnb_4bit_quant_storage`) must give the
    loss and gradients of the usual uint8 packing, with whole-layer checkpointing (what FSDP-QLoRA runs)
    and with the lean default."""
    import bitsandbytes as bnb

    from students.model import LoraSettings, StudentSpec, load_student

    spec = StudentSpec(path=str(kd_pair[1]), quant="nf4", lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                       checkpoint_layers=checkpoint_layers)
    results = {}
    for storage in (None, torch.bfloat16):
        torch.manual_seed(0)
        model, tok = load_student(spec, device="cpu", quant_storage=storage)
        packed = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
        assert packed.dtype == (storage or torch.uint8)
        assert model.base_model.model.is_gradient_checkpointing == (checkpoint_layers == "all")
        ids = torch.tensor([tok.encode("Tom has 3 apples and buys 4 more")])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads)
        results[storage] = (loss.detach(), grads)
    (l1, g1), (l2, g2) = results[None], results[torch.bfloat16]
    torch.testing.assert_close(l2, l1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name])
