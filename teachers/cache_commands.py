"""`distill cache build|info|verify` and `distill teacher import-gguf`.

Thin wrappers: the work is in `teachers/cache_build.py`, `distill/cache/verify.py` and
`teachers/gguf_import.py`, which the pipeline calls directly as Python functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer


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
    @cache_app.command("build")
    def build(
        teacher: str = typer.Option(..., "--teacher", help="Teacher: model directory, hub id, or a .gguf file."),
        data: str = typer.Option(..., "--data", help="JSONL/Parquet file, saved datasets dir, or hub data set id."),
        out: Path = typer.Option(..., "--out", help="Cache directory (new, empty, or a cache to resume)."),
        top_k: Optional[int] = typer.Option(None, "--top-k", help="Codec topk: number of teacher tokens stored per position."),
        temperature: float = typer.Option(1.0, "--temperature", help="Log-probs are log_softmax(logits / T)."),
        max_length: int = typer.Option(2048, "--max-length", help="Sequences are cut to this many tokens (counted)."),
        dtype: str = typer.Option("fp16", "--dtype", help="Stored log-prob dtype: fp16, bf16 or q8 (8 bits, square-root grid, docs/cache-format.md)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Max sequences per teacher forward."),
        batch_tokens: int = typer.Option(16384, "--batch-tokens", help="Max padded tokens per teacher forward."),
        shard_size: int = typer.Option(1024, "--shard-size", help="Sequences per shard (the unit of resume)."),
        field: Optional[List[str]] = typer.Option(None, "--field", help="Map a field: NAME=COLUMN, NAME in prompt, completion, messages, text."),
        split: Optional[str] = typer.Option(None, "--split", help="Data set split (default train)."),
        data_config: Optional[str] = typer.Option(None, "--data-config", help="Hub data set config name (e.g. main for gsm8k)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N records."),
        chat: bool = typer.Option(False, "--chat", help="Wrap prompt/completion records in the chat template."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the teacher's own Python code to run."),
        quant: str = typer.Option("none", "--quant", help="Load the teacher as none, nf4 or int8."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
        teacher_dtype: Optional[str] = typer.Option(None, "--teacher-dtype", help="bf16, fp16 or fp32 (default bf16 on GPU, fp32 on CPU)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the teacher."),
        backend: str = typer.Option("hf", "--backend", help="Teacher backend that runs the model (hf: Hugging Face transformers)."),
        codec: str = typer.Option("topk", "--codec", help="What is stored per position: topk (the k most likely ids and log-probs), sampled (N draws: distinct ids + counts) or topk+sampled (exact top-k + N tail draws)."),
        samples: Optional[int] = typer.Option(None, "--samples", help="Codecs sampled, topk+sampled: draws per position (1..255)."),
        proposal_temperature: float = typer.Option(1.0, "--proposal-temperature", help="Codec sampled: draw from p^(1/T') (T' > 1 flatter) and store importance weights."),
        seed: int = typer.Option(0, "--seed", help="Sampled codecs: base seed of the per-position draws."),
        pack_ids: bool = typer.Option(False, "--pack-ids", help="Bit-pack ids to ceil(log2 V) bits (and draw counts to their width)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    ) -> None:
        """Run a teacher over a data set and cache its next-token distributions (resumable)."""
        from distill.data.records import parse_field_map
        from teachers.cache_build import build_cache

        build_cache(
            teacher, data, out, top_k=top_k, temperature=temperature, max_length=max_length, dtype=dtype,
            batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size, fields=parse_field_map(field),
            split=split, data_config=data_config, limit=limit, as_chat=chat, trust_remote_code=trust_remote_code,
            quant=quant, device=device, teacher_dtype=teacher_dtype, revision=revision, progress=not no_progress,
            backend=backend, codec=codec, samples=samples, proposal_temperature=proposal_temperature, seed=seed,
            pack_ids=pack_ids,
        )

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

    @teacher_app.command("import-gguf")
    def import_gguf_cmd(
        file: Path = typer.Argument(..., help="A .gguf model file."),
        out: Path = typer.Option(..., "--out", help="Directory for the plain safetensors model + tokenizer."),
    ) -> None:
        """Turn a GGUF file into a plain safetensors model directory with its tokenizer."""
        from teachers.gguf_import import import_gguf

        import_gguf(file, out)
        typer.echo(f"imported {file} -> {out}")
