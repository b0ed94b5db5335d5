"""Weight quantization at load time through bitsandbytes: the one list of choices and their configs.

"nf4": 4-bit NormalFloat with double quantization (the QLoRA recipe), computing in the given dtype;
"int8": LLM.int8(); "none": the weights as stored. bitsandbytes runs both on the CPU too, so every
path is testable without a GPU. The benchmark's "auto" (keep what the checkpoint declares) is the
benchmark's own choice and is resolved there.
"""

from __future__ import annotations

from distill.errors import DistillError

QUANT_CHOICES = ("none", "nf4", "int8")


def check_quant(quant: str, *, flag: str = "--quant") -> str:
    if quant not in QUANT_CHOICES:
        raise DistillError(f"unknown quantization {quant!r} for {flag}; use one of {', '.join(QUANT_CHOICES)}")
    return quant


def bnb_config(quant: str, compute_dtype, *, cpu_offload: bool = False, quant_storage=None):
    """The transformers BitsAndBytesConfig for `quant`, or None for "none".

    `cpu_offload`: a device map may put the layers that do not fit the GPUs on the CPU; bitsandbytes
    then keeps those unquantized (fp32) instead of refusing the map.
    `quant_storage`: the dtype NF4 weights are packed into (default uint8). FSDP and DeepSpeed ZeRO-3
    shard only float tensors, all of one dtype per unit: a student sharded by them stores its NF4
    weights in its compute dtype (the FSDP-QLoRA recipe)."""
    check_quant(quant)
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_enable_fp32_cpu_offload=cpu_offload,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
