"""`distill teacher generate` and `distill teacher filter`: reasoning traces and their rule rewards."""

from __future__ import annotations

from typing import List, Optional

import typer

from distill.errors import DistillError


def _parse_fields(items: list[str] | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in items or []:
        key, sep, column = item.partition("=")
        key, column = key.strip(), column.strip()
        if not sep or key not in ("question", "answer", "id") or not column:
            raise DistillError(f"--field {item!r} must be question=COLUMN, answer=COLUMN or id=COLUMN")
        fields[key] = column
    return fields


def generate(
    teacher: str = typer.Option(..., "--teacher", help="Teacher: model directory, hub id, or a .gguf file."),
    data: str = typer.Option(..., "--data", help="Problems: JSONL file (question/answer), a directory with "
                             "{split}.jsonl, synthetic:N[:SEED[:MIN-MAX steps]], or gsm8k[:SPLIT] (hub)."),
    out: str = typer.Option(..., "--out", help="Traces JSONL; appended to and resumed if it exists."),
    samples: int = typer.Option(1, "--samples", "-n", help="Traces per problem."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Longest completion in tokens."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt",
                                                help="System prompt (default asks for <think>...</think> then "
                                                     "the answer; pass '' for none)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N problems."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows generated together."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (each trace is seeded by seed, prompt, sample)."),
    field: Optional[List[str]] = typer.Option(None, "--field", help="Map columns: question=COL, answer=COL, id=COL."),
    split: str = typer.Option("test", "--split", help="Split for data directories and the hub."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    quant: str = typer.Option("none", "--teacher-quant", help="Load the teacher as none, nf4 or int8."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto: spread a teacher too big for one GPU over this machine's GPUs, then the CPU (docs/scale-out.md)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repo's own code."),
    backend: str = typer.Option("hf", "--backend", help="Teacher backend that runs the model (hf: Hugging Face transformers)."),
) -> None:
    """Sample reasoning traces from a teacher (resumable; progress bar with tokens/s).

    Under `accelerate launch --num_processes N` the N processes share the problems (docs/scale-out.md)."""
    from teachers.generate import generate_traces

    summary = generate_traces(teacher=teacher, data=data, out=out, samples=samples, temperature=temperature,
                              top_p=top_p, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                              limit=limit, batch_size=batch_size, seed=seed, fields=_parse_fields(field),
                              split=split, device=device, quant=quant, device_map=device_map,
                              trust_remote_code=trust_remote_code, backend=backend)
    if summary.get("processes", 1) > 1 and not _is_main():
        return
    st = summary["stats"]
    typer.echo(f"wrote {summary['written']} traces ({summary['skipped']} already done) for "
               f"{summary['problems']} problems x {summary['samples']} samples to {summary['out']}; "
               f"{st['new_tokens']} tokens in {st['seconds']:.1f}s = {st['tokens_per_s']:.1f} tok/s")


def _is_main() -> bool:
    from distill.ranks import current_ranks

    return current_ranks().is_main


def filter_cmd(
    traces: str = typer.Argument(..., help="Traces JSONL written by `distill teacher generate`."),
    out: str = typer.Option(..., "--out", help="Kept traces as chat records (the cache's input)."),
    keep: str = typer.Option("all-correct", "--keep", help="all-correct | first-correct | best | all"),
    require_format: bool = typer.Option(True, "--require-format/--no-require-format",
                                        help="Also require one well-formed <think>...</think> block."),
) -> None:
    """Score traces with rule rewards and keep the correct ones; report yield per prompt and overall."""
    from teachers.filter import filter_traces

    filter_traces(traces, out, keep=keep, require_format=require_format, echo=typer.echo)


def register(teacher_app: typer.Typer) -> None:
    """Add `generate` and `filter` to the `distill teacher` group."""
    teacher_app.command("generate")(generate)
    teacher_app.command("filter")(filter_cmd)
