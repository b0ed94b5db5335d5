"""Selective recomputation ("lean" layers): keep the expensive activations, recompute the cheap ones.

Why: in a LoRA'd decoder layer most of what autograd keeps for the backward pass is not the output
of matrix products but of cheap elementwise steps. Measured per token on the demo's student
(SmolLM2, hidden 576, MLP 1536, fp32, `benchmarks/bench_checkpointing.py --breakdown`): of ~10,300
floats a layer keeps, 1,536 are act(gate) and 1,536 the product act(gate) * up (the input of
down_proj's LoRA A), ~1,170 the two norms' outputs (the inputs of the q/k/v and gate/up LoRA A);
with LoRA dropout on the CPU each adapted linear also keeps its float dropout noise and its dropped
input (+7,300 floats). Each of these is a few elementwise operations away from tensors the layer
keeps anyway (gate, up, the norm's input, a one-byte mask), so it is recomputed in the backward pass
instead of stored (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models": recompute what is memory-heavy and cheap, not whole layers).

How: a tensor the forward pass is about to save is registered here with a *recipe* (a function
that rebuilds it bit for bit from kept tensors). While a lean layer runs, a saved-tensor pack hook
replaces a registered tensor (or a view of it) by its recipe; the unpack hook runs the recipe when
the backward pass needs it. The recipe repeats the forward's own operations on the same inputs, so
gradients are identical to storing. Layers that are checkpointed whole (`every:N`) run under the
checkpoint's own hooks and are left alone.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

# storage address -> (weak reference to the registered tensor, recipe). Only filled inside a lean
# layer's forward (`_scope`), emptied when it ends; the weak reference guards against a freed
# address being reused by another tensor.
_REGISTRY: dict[int, tuple] = {}
_DEPTH = [0]


class _Recipe:
    """What autograd stores instead of a registered tensor: how to rebuild it and which view it was."""

    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn, t: torch.Tensor):
        self.fn, self.size, self.stride, self.offset = fn, t.size(), t.stride(), t.storage_offset()


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active around the lean layer (e.g. an
    offloading or a measuring hook): they still see every tensor the layer really stores."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


def _outer_hooks():
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - other torch versions
        return None


def _make_pack(outer):
    def pack(t: torch.Tensor):
        entry = _REGISTRY.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if entry is not None and entry[0]() is not None:
            return _Recipe(entry[1], t)
        return _Outer(outer[0](t), outer[1]) if outer else t

    return pack


def _unpack(x):
    if isinstance(x, _Recipe):
        with torch.no_grad():
            full = x.fn()
        return full.as_strided(x.size, x.stride, x.offset)
    if isinstance(x, _Outer):
        return x.unpack(x.packed)
    return x


def active() -> bool:
    return _DEPTH[0] > 0


def register(t: torch.Tensor, fn) -> None:
    """`t` (a fresh contiguous tensor) can be rebuilt by `fn()`; inside a lean layer it is not stored."""
    if _DEPTH[0] and t.is_contiguous() and t.storage_offset() == 0:
        _REGISTRY[t.untyped_storage().data_ptr()] = (weakref.ref(t), fn)


def source(t: torch.Tensor):
    """A function returning `t` later: its recipe when it has one (so a recipe built on `t` does not
    keep `t` alive), else `t` itself."""
    entry = _REGISTRY.get(t.untyped_storage().data_ptr()) if _DEPTH[0] else None
    if entry is not None and entry[0]() is t:
        return entry[1]
    return lambda: t


@contextmanager
def _scope():
    outer = _outer_hooks()
    _DEPTH[0] += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_make_pack(outer), _unpack):
            yield
    finally:
        _DEPTH[0] -= 1
        if not _DEPTH[0]:
            _REGISTRY.clear()


# ---- the lean pieces -----------------------------------------------------------------------------

def _lean_mlp_forward(mlp):
    """down(act(gate(x)) * up(x)) keeping gate and up only: act(gate) and the product are recomputed."""

    def forward(x):
        gate = mlp.gate_proj(x)
        up = mlp.up_proj(x)
        act = mlp.act_fn(gate)
        if not active():
            return mlp.down_proj(act * up)
        register(act, lambda: mlp.act_fn(gate))
        h = act * up
        register(h, lambda: mlp.act_fn(gate) * up)
        del act
        return mlp.down_proj(h)

    return forward


def _lean_norm_forward(norm, original):
    """A norm whose output is recomputed from its input (which the norm keeps for its own backward)."""

    def forward(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        if active() and isinstance(out, torch.Tensor):
            register(out, lambda: original(x, *args, **kwargs))
        return out

    return forward


class LeanDropout(torch.nn.Dropout):
    """nn.Dropout that keeps a one-byte mask instead of its float noise and its output.

    On the CPU, torch's dropout draws `noise = bernoulli(1 - p) / (1 - p)` and returns `x * noise`;
    autograd keeps the noise (4 bytes an element) and the LoRA A after it keeps the output (4 more).
    This draws the same noise from the same generator (identical results and random stream), keeps
    `noise != 0`, and registers noise and output as recipes. Elsewhere (CUDA's fused dropout already
    keeps a one-byte mask) and outside a lean layer it is torch's dropout.
    """

    def forward(self, x):
        p = self.p
        if not (self.training and 0 < p < 1 and active() and x.device.type == "cpu" and not self.inplace):
            return super().forward(x)
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        mask = noise != 0
        dtype = x.dtype

        def rebuild_noise():
            return mask.to(dtype).div_(1 - p)

        x_again = source(x)
        register(noise, rebuild_noise)
        y = x * noise
        register(y, lambda: x_again() * rebuild_noise())
        return y


def make_lean(model, on: bool = True) -> int:
    """Make every decoder layer of `model` lean (when it is not checkpointed whole); returns how many.

    `on=False` turns the lean layers back into plain ones (the wrappers stay, inactive), so that a
    benchmark can switch policies on one model.

    A lean layer's MLP keeps gate and up but not act(gate) or act(gate) * up, its norms do not keep
    their outputs, and its LoRA dropout keeps a bool mask (see the module docstring). Model families
    whose MLP is not `down_proj(act_fn(gate_proj(x)) * up_proj(x))` keep their MLP as is.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        count += on
        if hasattr(layer, "_distill_lean"):
            layer._distill_lean = on
            continue
        for name, child in layer.named_children():
            if all(hasattr(child, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                child.forward = _lean_mlp_forward(child)
            elif "norm" in name.lower() and not list(child.children()):
                child.forward = _lean_norm_forward(child, child.forward)
        for module in layer.modules():
            if type(module) is torch.nn.Dropout and module.p > 0:
                module.__class__ = LeanDropout
        original = layer.forward

        def forward(*args, _layer=layer, _original=original, **kwargs):
            if not _layer._distill_lean or (_layer.gradient_checkpointing and _layer.training and torch.is_grad_enabled()):
                return _original(*args, **kwargs)  # checkpointed whole: the checkpoint's hooks apply
            with _scope():
                return _original(*args, **kwargs)

        layer.forward = forward
        layer._distill_lean = on
    return count
