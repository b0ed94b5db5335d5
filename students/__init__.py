"""Student side: build a (quantized, LoRA) student, train it on the teacher cache, export it."""
