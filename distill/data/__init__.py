"""Data sources: generic records (JSONL, Parquet, datasets), GSM8K, synthetic arithmetic problems."""
