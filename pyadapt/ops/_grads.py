"""How backward ops hand gradients across the custom-op boundary.

A custom op cannot return None, so every backward op returns one tensor per differentiable
input: the gradient (in the input's dtype) when the input is present and needs it, otherwise an
empty placeholder. Presence and need decide, never the content (a gradient of M = 0 rows is
legitimately empty). Gradients are contiguous whatever the input's strides, and so are the
fake-tensor results, so real and fake outputs agree (opcheck, torch.compile)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def wanted(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> list[bool]:
    return [t is not None and bool(n) for t, n in zip(inputs, needs)]


def pack(grads: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]],
         needs: Sequence[bool], like: Tensor) -> list[Tensor]:
    out = []
    for g, t, w in zip(grads, inputs, wanted(inputs, needs)):
        out.append(g.to(t.dtype).reshape(t.shape).contiguous() if w else like.new_empty(0))
    return out


def fake(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], like: Tensor) -> list[Tensor]:
    return [t.new_empty(t.shape) if w else like.new_empty(0)
            for t, w in zip(inputs, wanted(inputs, needs))]


def unpack(packed: Sequence[Tensor], inputs: Sequence[Optional[Tensor]],
           needs: Sequence[bool]) -> list[Optional[Tensor]]:
    return [g if w else None for g, w in zip(packed, wanted(inputs, needs))]
