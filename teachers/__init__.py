"""Teacher side: load a teacher, import GGUF models, generate and verify traces, build the cache."""
