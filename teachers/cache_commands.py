"""`distill cache build|info|verify|merge` and `distill teacher import-gguf`.

Thin wrappers: the work is in `teachers/cache_build.py`, `distill/cache/verify.py`,
`distill/cache/merge.py` and `teachers/gguf_import.py`, which the pipeline calls directly as Python
functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from distill.options import typer_command
from teachers.cache_settings import CacheBuildConfig


def cache_summary(path: str | Path) -> dict:
    """The figures `distill cache info` shows, as a dict (also used by --json)."""
    from distill.cache.codecs import codec_for_manifest
    from distill.cache.format import read_manifest

    m = read_manifest(path)
    codec = codec_for_manifest(m)
    tokens = m.num_tokens
    return {
        "path": str(path),
        "complete": m.complete,
        "sequences": m.num_cached_samples,
        "sequences_planned": m.num_samples,
        "tokens": tokens,
        "trained_positions": m.num_rows,
        "k": m.k,
        "temperature": m.temperature,
        "vocab": m.tokenizer_length,
        "logits_width": m.logits_width,
        "codec": m.codec,
        "codec_params": m.codec_params,
        "training_temperatures": codec.exact_temperatures,
        "format_version": m.format_version,
        "value_dtype": m.value_dtype,
        "id_dtype": m.id_dtype,
        "shards": len(m.shards),
        "bytes": m.total_bytes,
        "bytes_per_token": round(m.total_bytes / tokens, 2) if tokens else None,
        "bytes_per_trained_position": round(m.total_bytes / m.num_rows, 2) if m.num_rows else None,
        # the codec's tensors alone (without the tokens, the mask and the offsets every codec shares)
        "codec_bytes_per_trained_position": round(m.codec_bytes / m.num_rows, 2) if m.num_rows and m.codec_bytes else None,
        "mean_tail_mass": round(m.mean_tail_mass, 6),
        "nominal_codec_bytes_per_row": codec.bytes_per_row(),
        "teacher": m.teacher.get("name_or_path"),
        "teacher_config_hash": m.teacher.get("config_hash"),
        "tokenizer_fingerprint": m.tokenizer_fingerprint,
        "truncated_samples": m.build.get("truncated_samples"),
    }


def register(cache_app: typer.Typer, teacher_app: typer.Typer) -> None:
    def build(cfg: CacheBuildConfig) -> None:
        """Run a teacher over a data set and cache its next-token distributions (resumable).

        Under `accelerate launch --multi_gpu --num_processes N` the N processes share the shards (docs/scale-out.md).
        """
        from teachers.cache_build import build_cache

        settings = vars(cfg).copy()
        build_cache(settings.pop("teacher"), settings.pop("data"), settings.pop("out"), **settings)

    cache_app.command("build")(typer_command(CacheBuildConfig, build))

    @cache_app.command("info")
    def info(
        path: Path = typer.Argument(..., help="Cache directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    ) -> None:
        """Sequences, tokens, k, vocabulary, codec, bytes per token, teacher, fingerprint, mean tail mass."""
        s = cache_summary(path)
        if as_json:
            typer.echo(json.dumps(s, indent=1))
            return
        width = max(len(k) for k in s)
        for key, value in s.items():
            typer.echo(f"{key.replace('_', ' '):<{width}}  {value}")

    @cache_app.command("verify")
    def verify(path: Path = typer.Argument(..., help="Cache directory.")) -> None:
        """Check every shard's checksum and structure; exit 1 naming the faulty shard."""
        from distill.cache.verify import verify_cache

        verify_cache(path)
        s = cache_summary(path)
        typer.echo(f"ok: {s['shards']} shards, {s['sequences']} sequences, {s['tokens']} tokens")

    @cache_app.command("merge")
    def merge(
        caches: List[Path] = typer.Argument(..., help="Complete caches to merge, in order (C holds A's samples, then B's, ...)."),
        out: Path = typer.Option(..., "--out", help="New directory for the merged cache."),
    ) -> None:
        """Merge caches built separately (other machines, other data slices) of one teacher, tokenizer,
        codec, k and temperature; shards are linked or copied unchanged, the manifest renumbered."""
        from distill.cache.merge import merge_caches

        m = merge_caches(caches, out)
        typer.echo(f"merged {len(caches)} caches into {out}: {len(m.shards)} shards, {m.num_samples} sequences, "
                   f"{m.num_tokens} tokens")

    @teacher_app.command("import-gguf")
    def import_gguf_cmd(
        file: Path = typer.Argument(..., help="A .gguf model file."),
        out: Path = typer.Option(..., "--out", help="Directory for the plain safetensors model + tokenizer."),
    ) -> None:
        """Turn a GGUF file into a plain safetensors model directory with its tokenizer."""
        from teachers.gguf_import import import_gguf

        import_gguf(file, out)
        typer.echo(f"imported {file} -> {out}")
