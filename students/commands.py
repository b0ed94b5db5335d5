"""CLI commands of the student stage: `distill train`, `distill student init`, `distill export`, and
`distill scorer train` (a reward model trained like a student: LoRA on one of our backbones).

The options are the fields of `TrainConfig`, `StudentInitConfig` and `ExportConfig`
(`distill.options.typer_command`). Heavy imports (torch, transformers) happen inside the commands so
that `distill --help` stays fast.
"""

from __future__ import annotations

import typer

from distill.options import typer_command
from students.export import ExportConfig
from students.init_student import StudentInitConfig
from students.scorer_train import ScorerTrainConfig
from students.train import TrainConfig

student_app = typer.Typer(help="Build students: keep a subset of the teacher's layers.", no_args_is_help=True)


def _init(cfg: StudentInitConfig) -> None:
    """Make a student from the teacher by keeping a subset of its decoder layers (same tokenizer)."""
    from students.init_student import init_student

    summary = init_student(**vars(cfg))
    typer.echo(f"student with {summary['student_layers']}/{summary['teacher_layers']} layers "
               f"({summary['parameters']:,} parameters, kept {summary['kept_layers']}) written to {cfg.out}")


def _train(cfg: TrainConfig) -> None:
    """Train a quantized LoRA student on a teacher cache with the chunked sparse-KD loss."""
    from students.train import train

    summary = train(cfg)
    if summary.get("batch_plan"):
        typer.echo(summary["batch_plan"]["message"])
    kl = summary.get("final_eval_kl")
    agree = summary.get("final_top1_agreement")
    typer.echo(f"trained {summary['steps']} steps; held-out KL {kl if kl is None else f'{kl:.4f}'}, "
               f"top-1 agreement {agree if agree is None else f'{agree:.3f}'}; adapters in {summary['final_dir']}")


def _export(cfg: ExportConfig) -> None:
    """Export a trained run as a model that `AutoModelForCausalLM.from_pretrained` loads."""
    from students.export import export_run

    summary = export_run(**vars(cfg))
    if summary["format"] == "gguf":
        typer.echo(f"exported {summary['architecture']} GGUF ({summary['gguf_type']}, "
                   f"{summary['bytes'] / 2**20:.1f} MiB) to {summary['out']}")
        return
    typer.echo(f"exported {summary['format']} ({summary['dtype']}) model to {summary['out']}")


def _rl(cfg) -> None:
    """GRPO on the student with TRL (the `rl` extra): our verifiers are the rewards; export and bench take the run."""
    from students.rl import train_rl

    summary = train_rl(cfg)
    first, last = summary["reward_first"], summary["reward_last"]
    typer.echo(f"GRPO {summary['steps']} steps; mean reward {first if first is None else f'{first:.3f}'} -> "
               f"{last if last is None else f'{last:.3f}'}; adapters in {summary['final_dir']}")


student_app.command("init")(typer_command(StudentInitConfig, _init))

scorer_app = typer.Typer(help="Scorers for distill bench: learned reward models from our own traces.",
                         no_args_is_help=True)


def _scorer_train(cfg: ScorerTrainConfig) -> None:
    """Train an outcome reward model (LoRA + classification head on a backbone) on the verifier's
    correct / incorrect labels of traces; saves a directory `distill bench --scorer` loads."""
    from students.scorer_train import _auc_text, train_scorer

    summary = train_scorer(cfg, log=typer.echo)
    h = summary["held_out"]
    typer.echo(f"scorer in {summary['out']}: held-out AUC {_auc_text(h['auc'])} on {h['traces']} traces of "
               f"{h['problems']} problems ({h['correct']} correct); train AUC {_auc_text(summary['train']['auc'])}")


scorer_app.command("train")(typer_command(ScorerTrainConfig, _scorer_train))


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
    app.add_typer(student_app, name="student")
    app.add_typer(scorer_app, name="scorer")
    app.command("train")(typer_command(TrainConfig, _train))
    app.command("export")(typer_command(ExportConfig, _export))
    from students.rl import RLConfig

    app.command("rl")(typer_command(RLConfig, _rl))
