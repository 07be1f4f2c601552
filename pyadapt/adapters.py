"""Bottleneck adapters: FusedAdapter (Houlsby/OFA style, optionally with an MMA shared middle
projection) and MultiModalAdapter (MMA's per-layer image/text pairs sharing one projection)."""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from . import _validate as check
from . import ops
from ._module import AdapterModule, cast, compute_dtype, rows
from .reference import ACTIVATIONS

Tensor = torch.Tensor

INITS = ("lora", "bert", "kaiming")


class FusedAdapter(AdapterModule):
    """y = residual + scale * up(drop(act(shared?(act(down(x)))))), residual defaulting to x.

    activation in relu, gelu, quick_gelu, silu, identity (applied after down and after shared);
    dropout acts on the input of `up` in training; scale is fixed (a buffer) or learnable
    (`learn_scale=True`, a parameter initialised to `scale`). `shared` is an
    nn.Linear(bottleneck, bottleneck) that may be used by several adapters (MMA): its gradient
    is then the sum of every user's. `grad_scale_invariant=True` is MMA's gradient-scale
    convention: adapter parameter gradients are divided by scale (they train as if scale were 1)
    while the gradient reaching x is the true one.

    init: "lora" (down Kaiming-uniform, up zero: the adapter starts as the identity),
    "bert" (normal std 0.02), "kaiming" (MMA's Kaiming-normal fan_out/relu on every weight);
    biases start at zero in all three."""

    def __init__(self, in_features: int, bottleneck: int, activation: str = "relu",
                 bias: bool = True, scale: float = 0.001, dropout: float = 0.0,
                 init: str = "lora", shared: Optional[nn.Linear] = None, *,
                 learn_scale: bool = False, grad_scale_invariant: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = check.positive_int("in_features", in_features)
        self.bottleneck = check.positive_int("bottleneck", bottleneck)
        self.activation = check.choice("activation", activation, ACTIVATIONS)
        self.dropout = check.probability("dropout", dropout)
        check.choice("init", init, INITS)
        scale = check.finite("scale", scale)
        if shared is not None:
            if not isinstance(shared, nn.Linear):
                raise TypeError(f"shared: expected an nn.Linear or None, got "
                                f"{type(shared).__name__}")
            if (shared.in_features, shared.out_features) != (bottleneck, bottleneck):
                raise ValueError(f"shared: expected nn.Linear({bottleneck}, {bottleneck}) "
                                 f"(bottleneck x bottleneck), got nn.Linear("
                                 f"{shared.in_features}, {shared.out_features})")
        self.grad_scale_invariant = bool(grad_scale_invariant)
        if self.grad_scale_invariant and scale == 0.0:
            raise ValueError("scale: expected a non-zero value with grad_scale_invariant=True")
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Linear(in_features, bottleneck, bias=bias, **factory)
        self.up = nn.Linear(bottleneck, in_features, bias=bias, **factory)
        self.shared = shared
        # A fixed scale stays a Python float (exact: a float32 buffer would round 0.001).
        self.scale = nn.Parameter(torch.tensor(scale, **factory)) if learn_scale else scale
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "lora") -> None:
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.up.weight)
            elif init == "bert":
                nn.init.normal_(self.down.weight, std=0.02)
                nn.init.normal_(self.up.weight, std=0.02)
            else:
                nn.init.kaiming_normal_(self.down.weight, mode="fan_out", nonlinearity="relu")
                nn.init.kaiming_normal_(self.up.weight, mode="fan_out", nonlinearity="relu")
            for lin in (self.down, self.up):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield from self.named_parameters()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None,
                row_scale: Optional[Tensor] = None) -> Tensor:
        """x (..., in_features); residual of the same shape or None (then x); row_scale, one
        factor per row of x (shape x.shape[:-1]), multiplies each row's adapter output."""
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.down.weight, "down.weight")
        res2 = None
        if residual is not None:
            check.tensor("residual", residual)
            check.shape("residual", residual, tuple(x.shape), "the shape of x")
            res2 = residual.reshape(x2.shape)
        rs2 = None
        if row_scale is not None:
            check.tensor("row_scale", row_scale)
            check.shape("row_scale", row_scale, tuple(x.shape[:-1]), "x.shape[:-1]")
            rs2 = row_scale.reshape(-1)
        shared = self.shared

        def w(name, t):
            return cast(self._current(name, t), dtype)

        y = ops.bottleneck(
            cast(x2, dtype), w("down.weight", self.down.weight), w("down.bias", self.down.bias),
            w("up.weight", self.up.weight), w("up.bias", self.up.bias),
            None if shared is None else w("shared.weight", shared.weight),
            None if shared is None else w("shared.bias", shared.bias),
            residual=res2, scale=self._current("scale", self.scale), activation=self.activation,
            dropout_p=self.dropout if self.training else 0.0, row_scale=rs2,
            grad_scale_invariant=self.grad_scale_invariant)
        return y.reshape(*x.shape[:-1], self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, bottleneck={self.bottleneck}, "
                f"activation={self.activation}, dropout={self.dropout}, "
                f"shared={self.shared is not None}, "
                f"grad_scale_invariant={self.grad_scale_invariant}")


class MultiModalAdapter(nn.Module):
    """MMA: for every layer index i, an image adapter (vision_dim) and a text adapter (text_dim),
    each with its own down and up, sharing ONE middle projection Linear(bottleneck, bottleneck)
    at that index. A(z) = up(relu(shared(relu(down(z))))) times scale, with MMA's
    gradient-scale convention on by default and MMA's Kaiming-normal init.

    `layers` are the block indices that carry adapters (the official code uses 1-based blocks
    5..12 of ViT-B/16, the default here)."""

    def __init__(self, vision_dim: int = 768, text_dim: int = 512, bottleneck: int = 32,
                 layers: Iterable[int] = range(5, 13), scale: float = 0.001, *,
                 activation: str = "relu", grad_scale_invariant: bool = True,
                 init: str = "kaiming", device=None, dtype=None):
        super().__init__()
        check.positive_int("vision_dim", vision_dim)
        check.positive_int("text_dim", text_dim)
        check.positive_int("bottleneck", bottleneck)
        self.layers = sorted(set(int(i) for i in layers))
        if not self.layers:
            raise ValueError("layers: expected at least one layer index")
        factory = {"device": device, "dtype": dtype}
        self.shared = nn.ModuleDict()
        self.vision_adapters = nn.ModuleDict()
        self.text_adapters = nn.ModuleDict()
        for i in self.layers:
            shared = nn.Linear(bottleneck, bottleneck, **factory)
            with torch.no_grad():
                if init == "kaiming":
                    nn.init.kaiming_normal_(shared.weight, mode="fan_out", nonlinearity="relu")
                elif init == "bert":
                    nn.init.normal_(shared.weight, std=0.02)
                nn.init.zeros_(shared.bias)
            self.shared[str(i)] = shared
            for adapters, dim in ((self.vision_adapters, vision_dim),
                                  (self.text_adapters, text_dim)):
                adapters[str(i)] = FusedAdapter(dim, bottleneck, activation, True, scale, 0.0, init,
                                                shared, grad_scale_invariant=grad_scale_invariant,
                                                **factory)

    def _get(self, adapters: nn.ModuleDict, i: int) -> FusedAdapter:
        if str(i) not in adapters:
            raise KeyError(f"layer: no adapter at index {i}; adapted layers are {self.layers}")
        return adapters[str(i)]

    def vision(self, i: int) -> FusedAdapter:
        return self._get(self.vision_adapters, i)

    def text(self, i: int) -> FusedAdapter:
        return self._get(self.text_adapters, i)

    def both(self, i: int, x_image: Tensor, x_text: Tensor,
             residual_image: Optional[Tensor] = None,
             residual_text: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Layer i's image and text adapters in one op (pyadapt.ops.mma_pair; one launch on the
        triton backend), for steps where both towers run: equal to (vision(i)(x_image,
        residual_image), text(i)(x_text, residual_text)), the shared projection's gradient being
        the sum of both branches'. x_image (..., vision_dim), x_text (..., text_dim). Adapter
        dropout, row_scale and EMA evaluation are not part of this path: with any of them on,
        the two adapters run separately."""
        vision, text = self.vision(i), self.text(i)
        # The branches' own training flags: the MultiModalAdapter may sit outside the model's
        # module tree (open_clip's add_mma keeps it as a plain attribute).
        separate = ((vision.dropout > 0.0 and vision.training) or
                    (text.dropout > 0.0 and text.training))
        separate = separate or any(a._ema_in_eval and a._ema_shadow is not None and
                                   not a.training for a in (vision, text))
        if separate:
            return vision(x_image, residual_image), text(x_text, residual_text)
        xs, residuals = [], []
        for name, a, x, res in (("x_image", vision, x_image, residual_image),
                                ("x_text", text, x_text, residual_text)):
            x2 = rows(name, x, a.in_features, "in_features")
            res2 = None
            if res is not None:
                check.tensor(name.replace("x_", "residual_"), res)
                check.shape(name.replace("x_", "residual_"), res, tuple(x.shape),
                            f"the shape of {name}")
                res2 = res.reshape(x2.shape)
            xs.append(x2)
            residuals.append(res2)
        dtype = compute_dtype(x_image, vision.down.weight, "down.weight")
        compute_dtype(x_text, text.down.weight, "down.weight")
        shared = vision.shared

        def w(t):
            return cast(t, dtype)

        y_v, y_t = ops.mma_pair(
            cast(xs[0], dtype), cast(xs[1], dtype), w(vision.down.weight), w(vision.down.bias),
            w(vision.up.weight), w(vision.up.bias), w(text.down.weight), w(text.down.bias),
            w(text.up.weight), w(text.up.bias), w(shared.weight), w(shared.bias),
            residual_v=residuals[0], residual_t=residuals[1], scale_v=vision.scale,
            scale_t=text.scale, activation=vision.activation,
            grad_scale_invariant=vision.grad_scale_invariant)
        return (y_v.reshape(*x_image.shape[:-1], vision.in_features),
                y_t.reshape(*x_text.shape[:-1], text.in_features))

    def forward(self, x: Tensor, layer: int, modality: str,
                residual: Optional[Tensor] = None) -> Tensor:
        check.choice("modality", modality, ("vision", "text"))
        adapter = self.vision(layer) if modality == "vision" else self.text(layer)
        return adapter(x, residual)
