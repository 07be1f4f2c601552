"""AdapterBank: many adapters of one kind applied to one mixed batch, each sample (or row) by its
own adapter, in one op (pyadapt.ops.bank). Kinds done: bottleneck / MMA adapters
(pyadapt.FusedAdapter, with or without a shared middle projection) in AdapterBank, LoRA
adapters of one frozen linear (pyadapt.LowRankAdapter) in LowRankAdapterBank, and
R-Adapters of one frozen linear (pyadapt.RAdapter, full rank through the grouped-linear op
pyadapt.ops.bank_linear, or low rank) in RAdapterBank, and CP/Tucker (Aurora) sites of one
frozen linear (pyadapt.CPLinear) in CPAdapterBank; AdapterBank.from_adapters builds whichever
fits the modules it is given."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as check
from . import reference
from ._module import AdapterModule, cast, compute_dtype, rows
from .adapters import FusedAdapter
from .linear import (CORES, DROP_GRANULARITIES, DROPOUT_POSITIONS, CPAdapter, CPLinear,
                     LowRankAdapter, RAdapter)
from .ops import bank as bank_ops
from .ops.bank_linear import bank_linear
from .reference import ACTIVATIONS

Tensor = torch.Tensor

# state-dict names of one FusedAdapter (pyadapt.adapter_state_dict of the adapter itself)
_ADAPTER_KEYS = ("down.weight", "down.bias", "shared.weight", "shared.bias", "up.weight",
                 "up.bias")


def _common_value(name: str, values: Sequence, what: str = "adapters") -> object:
    """The one value of a training knob (dropout probability, ...) the adapters share: a bank
    applies one to all its slots, so differing values are refused rather than averaged."""
    values = list(values)
    for i, v in enumerate(values):
        if v != values[0]:
            raise ValueError(f"{what}[{i}]: expected {name} {values[0]} (as {what}[0]), got {v}; "
                             f"a bank applies one {name} to every adapter (set it alike, e.g. "
                             f"0.0 for inference)")
    return values[0]


class AdapterBank(AdapterModule):
    """N bottleneck adapters stored as stacked tensors, applied per sample or per row:

        y[m] = residual[m] + scale[a] * up_a(act(shared_a?(act(down_a(x[m])))))   a = ids[m]
        y[m] = residual[m]                                                       ids[m] == -1

    (residual defaults to x). Parameters: down_weight (N, r, d), up_weight (N, d, r),
    down_bias (N, r) and up_bias (N, d) when bias, shared_weight (N, r, r) and shared_bias (N, r)
    when shared; scale (N,) is a parameter with learn_scale, else a float64 buffer (fixed
    scales stay exact). Every stacked tensor is an ordinary parameter: a mixed batch trains all
    the adapters it names (multi-task training); adapters no row names get zero gradient.

    Build it from trained modules (`from_adapters`), from saved adapter state dicts
    (`from_state_dicts`), or fresh; `to_adapters()` gives FusedAdapter modules back. Each adapter
    gets its own copy of a shared projection (an MMA layer's image and text adapters share one;
    a bank of image adapters from N tasks holds N of them).

    Adapter ids: see `forward`. validate=True (default) checks their range with one host sync
    and raises ValueError; validate=False (serving) never syncs, and out-of-range ids then pass
    their rows through unchanged, like -1.

    It is an adapter module like the others: pyadapt.adapter_state_dict / checkpoints hold its
    stacked tensors, and pyadapt.AdapterEMA averages them (eval then uses the shadows).
    Dropout: in training with dropout > 0 each call draws a fresh seed (as FusedAdapter does)
    and drops the r-wide input of `up` with the mask of pyadapt.ops.bank: element (m, k) of the
    flattened batch row m, so a batch whose rows all name adapter a gets exactly the mask
    FusedAdapter a would draw from the same seed; eval applies none. from_adapters takes the
    adapters' common p (differing values are refused). Not supported: row_scale."""

    kind = "bottleneck"

    def __init__(self, num_adapters: int, in_features: int, bottleneck: int,
                 activation: str = "relu", bias: bool = True,
                 scale: float | Sequence[float] = 0.001, shared: bool = False, *,
                 shared_bias: bool = True, learn_scale: bool = False,
                 grad_scale_invariant: bool = False, dropout: float = 0.0,
                 validate: bool = True, device=None, dtype=None):
        super().__init__()
        n = self.num_adapters = check.positive_int("num_adapters", num_adapters)
        d = self.in_features = check.positive_int("in_features", in_features)
        r = self.bottleneck = check.positive_int("bottleneck", bottleneck)
        self.activation = check.choice("activation", activation, ACTIVATIONS)
        self.dropout = check.probability("dropout", dropout)
        self.grad_scale_invariant = bool(grad_scale_invariant)
        self.validate = bool(validate)
        scales = [scale] * n if isinstance(scale, (int, float)) else list(scale)
        if len(scales) != n:
            raise ValueError(f"scale: expected one value per adapter ({n}), got {len(scales)}")
        scales = [check.finite("scale", s) for s in scales]
        if self.grad_scale_invariant and any(s == 0.0 for s in scales):
            raise ValueError("scale: expected non-zero values with grad_scale_invariant=True")
        factory = {"device": device, "dtype": dtype}

        def param(*shape):
            return nn.Parameter(torch.zeros(shape, **factory))

        self.down_weight = param(n, r, d)
        self.up_weight = param(n, d, r)
        self.down_bias = param(n, r) if bias else None
        self.up_bias = param(n, d) if bias else None
        self.shared_weight = param(n, r, r) if shared else None
        self.shared_bias = param(n, r) if shared and shared_bias else None
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(scales, **factory))
        else:
            self.register_buffer("scale", torch.tensor(scales, dtype=torch.float64,
                                                       device=device))
        self.learn_scale = bool(learn_scale)
        self._init_like_fused()

    def _init_like_fused(self) -> None:
        """Each slot starts as FusedAdapter's default ("lora") init: the identity map."""
        with torch.no_grad():
            for a in range(self.num_adapters):
                nn.init.kaiming_uniform_(self.down_weight[a], a=5 ** 0.5)
                if self.shared_weight is not None:
                    nn.init.kaiming_uniform_(self.shared_weight[a], a=5 ** 0.5)

    # -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids: Tensor, residual: Optional[Tensor] = None,
                validate: Optional[bool] = None) -> Tensor:
        """x (B, ..., d) or (M, d); adapter_ids one id per sample (shape (B,)) or per row (shape
        x.shape[:-1]), integers in [0, num_adapters) or -1 (no adapter: the row is
        residual[m]); residual like x or None (then x). validate overrides the bank's setting
        for this call."""
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.down_weight, "down_weight")
        ids = bank_ops.adapter_rows(adapter_ids, x, self.num_adapters,
                                    validate=self.validate if validate is None else validate)
        res2 = None
        if residual is not None:
            check.tensor("residual", residual)
            check.shape("residual", residual, tuple(x.shape), "the shape of x")
            res2 = residual.reshape(x2.shape)

        def w(name):
            t = getattr(self, name)
            return None if t is None else cast(self._current(name, t), dtype)

        y = bank_ops.bank_bottleneck(
            cast(x2, dtype), ids, w("down_weight"), w("down_bias"), w("up_weight"), w("up_bias"),
            w("shared_weight"), w("shared_bias"), scale=self._current("scale", self.scale),
            residual=res2, activation=self.activation,
            grad_scale_invariant=self.grad_scale_invariant,
            dropout_p=self.dropout if self.training else 0.0)
        return y.reshape(*x.shape[:-1], self.in_features)

    # -----------------------------------------------------------------------------------------

    @classmethod
    def from_adapters(cls, adapters: Sequence[FusedAdapter], *,
                      validate: bool = True) -> "AdapterBank":
        """A bank holding copies of the given FusedAdapters' weights, adapter i at id i. All must
        have the same in_features, bottleneck, activation, bias, shared layout, scale kind
        (fixed or learnable), grad_scale_invariant, dtype and device."""
        adapters = list(adapters)
        if not adapters:
            raise ValueError("adapters: expected at least one adapter")
        if cls is AdapterBank and isinstance(adapters[0], LowRankAdapter):
            return LowRankAdapterBank.from_adapters(adapters, validate=validate)
        if cls is AdapterBank and isinstance(adapters[0], RAdapter):
            return RAdapterBank.from_adapters(adapters, validate=validate)
        if cls is AdapterBank and isinstance(adapters[0], (CPLinear, CPAdapter)):
            return CPAdapterBank.from_adapters(adapters, validate=validate)
        for i, a in enumerate(adapters):
            if not isinstance(a, FusedAdapter):
                raise TypeError(f"adapters[{i}]: expected a pyadapt.FusedAdapter, got "
                                f"{type(a).__name__}")
        first = adapters[0]

        def layout(a: FusedAdapter) -> dict:
            return {"in_features": a.in_features, "bottleneck": a.bottleneck,
                    "activation": a.activation, "bias": a.down.bias is not None,
                    "up bias": a.up.bias is not None, "shared": a.shared is not None,
                    "shared bias": a.shared is not None and a.shared.bias is not None,
                    "learnable scale": isinstance(a.scale, torch.Tensor),
                    "grad_scale_invariant": a.grad_scale_invariant,
                    "dtype": a.down.weight.dtype, "device": a.down.weight.device}

        want = layout(first)
        if want["bias"] != want["up bias"]:
            raise ValueError("adapters[0]: expected down and up both with or both without bias")
        for i, a in enumerate(adapters[1:], start=1):
            got = layout(a)
            for key, value in want.items():
                if got[key] != value:
                    raise ValueError(f"adapters[{i}]: expected {key} {value} (as adapters[0]), "
                                     f"got {got[key]}")
        learn = want["learnable scale"]
        scales = [float(a.scale.detach()) if learn else a.scale for a in adapters]
        bank = cls(len(adapters), first.in_features, first.bottleneck, first.activation,
                   bias=want["bias"], scale=scales, shared=want["shared"],
                   shared_bias=want["shared bias"], learn_scale=learn,
                   grad_scale_invariant=first.grad_scale_invariant,
                   dropout=_common_value("dropout", [a.dropout for a in adapters]),
                   validate=validate,
                   device=want["device"], dtype=want["dtype"])
        with torch.no_grad():
            for i, a in enumerate(adapters):
                bank.down_weight[i].copy_(a.down.weight)
                bank.up_weight[i].copy_(a.up.weight)
                if bank.down_bias is not None:
                    bank.down_bias[i].copy_(a.down.bias)
                    bank.up_bias[i].copy_(a.up.bias)
                if bank.shared_weight is not None:
                    bank.shared_weight[i].copy_(a.shared.weight)
                    if bank.shared_bias is not None:
                        bank.shared_bias[i].copy_(a.shared.bias)
                if learn:
                    bank.scale[i].copy_(a.scale.detach())
        return bank

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[dict], *, activation: str = "relu",
                         scale: float | Sequence[float] = 0.001,
                         grad_scale_invariant: bool = False, validate: bool = True,
                         device=None, dtype=None) -> "AdapterBank":
        """A bank from saved adapters: each state dict is pyadapt.adapter_state_dict of one
        FusedAdapter (keys down.weight, up.weight, optional down.bias, up.bias, shared.weight,
        shared.bias, and scale when it was learnable), possibly under one common prefix
        ("visual.adapter.down.weight", ...). Shapes give in_features and bottleneck; what a
        state dict does not hold (activation, a fixed scale, grad_scale_invariant) is given
        here."""
        state_dicts = list(state_dicts)
        if not state_dicts:
            raise ValueError("state_dicts: expected at least one adapter state dict")
        n = len(state_dicts)
        fixed = [scale] * n if isinstance(scale, (int, float)) else list(scale)
        if len(fixed) != n:
            raise ValueError(f"scale: expected one value per state dict ({n}), got {len(fixed)}")
        adapters = []
        for i, sd in enumerate(state_dicts):
            what = f"state_dicts[{i}]"
            if not isinstance(sd, dict):
                raise TypeError(f"{what}: expected a dict of tensors, got {type(sd).__name__}")
            prefixes = {k[:-len("down.weight")] for k in sd if k.endswith("down.weight")}
            if len(prefixes) != 1:
                raise ValueError(f"{what}: expected exactly one '<prefix>down.weight' key "
                                 f"(one FusedAdapter), found {len(prefixes)}")
            prefix = prefixes.pop()
            own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            unexpected = sorted(set(own) - set(_ADAPTER_KEYS) - {"scale"})
            if unexpected or len(own) != len(sd):
                extra = unexpected + sorted(k for k in sd if not k.startswith(prefix))
                raise ValueError(f"{what}: unexpected keys {extra}")
            if "up.weight" not in own:
                raise ValueError(f"{what}: missing key {prefix + 'up.weight'!r}")
            down = own["down.weight"]
            if not isinstance(down, torch.Tensor) or down.dim() != 2:
                raise ValueError(f"{what}[{prefix + 'down.weight'!r}]: expected a 2-D tensor "
                                 f"(bottleneck x in_features)")
            r, d = down.shape
            shared = None
            if "shared.weight" in own:
                shared = nn.Linear(r, r, bias="shared.bias" in own, device=device,
                                   dtype=dtype or down.dtype)
            adapter = FusedAdapter(d, r, activation, bias="down.bias" in own,
                                   scale=float(own["scale"]) if "scale" in own else fixed[i],
                                   shared=shared, learn_scale="scale" in own,
                                   grad_scale_invariant=grad_scale_invariant, device=device,
                                   dtype=dtype or down.dtype)
            if ("down.bias" in own) != ("up.bias" in own):
                raise ValueError(f"{what}: expected both or neither of down.bias and up.bias")
            expected = dict(adapter.named_parameters())
            for k, v in own.items():
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected[k].shape):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(f"{what}[{prefix + k!r}]: expected shape "
                                     f"{tuple(expected[k].shape)}, got {got}")
            with torch.no_grad():
                for k, v in own.items():
                    expected[k].copy_(v.reshape(expected[k].shape))
            adapters.append(adapter)
        return cls.from_adapters(adapters, validate=validate)

    def to_adapters(self) -> list[FusedAdapter]:
        """One FusedAdapter per slot, holding copies of its weights (each with its own shared
        projection when the bank has one)."""
        out = []
        dtype, device = self.down_weight.dtype, self.down_weight.device
        with torch.no_grad():
            for a in range(self.num_adapters):
                shared = None
                if self.shared_weight is not None:
                    shared = nn.Linear(self.bottleneck, self.bottleneck,
                                       bias=self.shared_bias is not None, device=device,
                                       dtype=dtype)
                    shared.weight.copy_(self.shared_weight[a])
                    if self.shared_bias is not None:
                        shared.bias.copy_(self.shared_bias[a])
                adapter = FusedAdapter(self.in_features, self.bottleneck, self.activation,
                                       bias=self.down_bias is not None,
                                       scale=float(self.scale[a]), dropout=self.dropout,
                                       shared=shared, learn_scale=self.learn_scale,
                                       grad_scale_invariant=self.grad_scale_invariant,
                                       device=device, dtype=dtype)
                adapter.down.weight.copy_(self.down_weight[a])
                adapter.up.weight.copy_(self.up_weight[a])
                if self.down_bias is not None:
                    adapter.down.bias.copy_(self.down_bias[a])
                    adapter.up.bias.copy_(self.up_bias[a])
                if self.learn_scale:
                    adapter.scale.copy_(self.scale[a])
                out.append(adapter)
        return out

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, in_features={self.in_features}, "
                f"bottleneck={self.bottleneck}, activation={self.activation}, "
                f"shared={self.shared_weight is not None}, learn_scale={self.learn_scale}")


class _FrozenLinearBank(AdapterModule):
    """What the banks over one frozen nn.Linear share: the base (frozen, its output computed
    once per batch), the slot count, the id handling, and the checks of from_adapters."""

    def _init_base(self, base: nn.Linear, num_adapters: int, validate: bool) -> dict:
        """Checks and stores base / num_adapters / validate; returns the factory kwargs."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.num_adapters = check.positive_int("num_adapters", num_adapters)
        self.validate = bool(validate)
        self.base = base
        base.requires_grad_(False)
        return {"device": base.weight.device, "dtype": base.weight.dtype}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _rows_ids_base(self, x: Tensor, adapter_ids: Tensor,
                       validate: Optional[bool]) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
        """(x as rows in the compute dtype, per-row ids, base(x) rows, compute dtype)."""
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.base.weight, "base.weight")
        ids = bank_ops.adapter_rows(adapter_ids, x, self.num_adapters,
                                    validate=self.validate if validate is None else validate)
        x2 = cast(x2, dtype)
        base_out = F.linear(x2, cast(self.base.weight, dtype), cast(self.base.bias, dtype))
        return x2, ids, base_out, dtype

    @staticmethod
    def _check_sources(adapters: list, kind: type, rank_of=lambda a: a.rank) -> None:
        """Every item unfolded, with adapters[0]'s rank and the same frozen base."""
        if not adapters:
            raise ValueError("adapters: expected at least one adapter")
        first = adapters[0]
        for i, a in enumerate(adapters):
            if not isinstance(a, kind):
                raise TypeError(f"adapters[{i}]: expected a pyadapt.{kind.__name__}, got "
                                f"{type(a).__name__}")
            if a.merged:
                raise ValueError(f"adapters[{i}]: is folded into its base; call "
                                 f"pyadapt.unfold_ first")
            if rank_of(a) != rank_of(first):
                raise ValueError(f"adapters[{i}]: expected rank {rank_of(first)} (as "
                                 f"adapters[0]), got {rank_of(a)}")
            if not _same_base(a.base, first.base):
                raise ValueError(f"adapters[{i}]: expected the same frozen base as adapters[0] "
                                 f"(a bank serves N tasks of one model)")


class LowRankAdapterBank(_FrozenLinearBank):
    """N LoRA adapters of ONE frozen linear (the same base model, N tasks), applied per sample or
    per row in one op:

        y[m] = base(x[m]) + scaling[a] * (x[m] A_a^T) B_a^T     a = ids[m] >= 0
        y[m] = base(x[m])                                       ids[m] == -1

    scaling[a] = alpha_a / rank (pyadapt.LowRankAdapter's form); A stacked as down_weight
    (N, rank, in), B as up_weight (N, out, rank); the base is frozen and computed once for the
    whole batch. Ids and validate as in AdapterBank.

    Dropout (training, dropout > 0), by dropout_position:
    - "rank" (default; pyadapt.LowRankAdapter's): drop(x A_a^T) B_a^T with the bank op's
      rank-space mask, element (m, k) of batch row m from a seed drawn per call as
      LowRankAdapter draws it: a batch whose rows all name adapter a equals LowRankAdapter a
      under the same generator state, so a bank trains like the adapters it was built from.
    - "input" (PEFT's LoRA): the adapter path reads dropout(x), the frozen base reads x
      undropped: y = base(x) + scaling[a] * (drop(x) A_a^T) B_a^T; torch's mask (F.dropout on
      the (M, in) rows in the compute dtype)."""

    kind = "lowrank"

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int = 16,
                 alpha: float | Sequence[float] = 16, *, dropout: float = 0.0,
                 dropout_position: str = "rank", validate: bool = True):
        super().__init__()
        factory = self._init_base(base, num_adapters, validate)
        n = self.num_adapters
        self.rank = check.positive_int("rank", rank)
        self.dropout_position = check.choice("dropout_position", dropout_position,
                                             ("input", "rank"))
        limit = min(base.in_features, base.out_features)
        if rank > limit:
            raise ValueError(f"rank: expected 1 <= rank <= {limit} (min(in_features, "
                             f"out_features) of base), got {rank}")
        alphas = [alpha] * n if isinstance(alpha, (int, float)) else list(alpha)
        if len(alphas) != n:
            raise ValueError(f"alpha: expected one value per adapter ({n}), got {len(alphas)}")
        self.alpha = [check.finite("alpha", a) for a in alphas]
        self.dropout = check.probability("dropout", dropout)
        self.down_weight = nn.Parameter(torch.empty(n, rank, base.in_features, **factory))
        self.up_weight = nn.Parameter(torch.zeros(n, base.out_features, rank, **factory))
        with torch.no_grad():
            for a in range(n):
                nn.init.kaiming_uniform_(self.down_weight[a], a=5 ** 0.5)
        self.register_buffer("scaling", torch.tensor([a / rank for a in self.alpha],
                                                     dtype=torch.float64,
                                                     device=base.weight.device))

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield "down_weight", self.down_weight
        yield "up_weight", self.up_weight

    def forward(self, x: Tensor, adapter_ids: Tensor, validate: Optional[bool] = None) -> Tensor:
        """x (B, ..., in_features); adapter_ids per sample (B,) or per row (x.shape[:-1])."""
        x2, ids, base_out, dtype = self._rows_ids_base(x, adapter_ids, validate)
        drop = self.dropout if self.training else 0.0
        rank_drop = {}
        if drop > 0.0 and self.dropout_position == "input":
            x2 = F.dropout(x2, drop, training=True)    # the adapter's input only
        elif drop > 0.0:
            rank_drop = {"dropout_p": drop}             # the op draws the seed
        y = bank_ops.bank_bottleneck(
            x2, ids, cast(self._current("down_weight", self.down_weight), dtype), None,
            cast(self._current("up_weight", self.up_weight), dtype), None, scale=self.scaling,
            residual=base_out, activation="identity", **rank_drop)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_adapters(cls, adapters: Sequence[LowRankAdapter], *, validate: bool = True,
                      dropout_position: str = "rank") -> "LowRankAdapterBank":
        """A bank holding copies of the LoRA weights of LowRankAdapters that wrap the same base
        (one module, or bases with identical weights and bias) with the same rank and the same
        dropout; the bank keeps the first adapter's base module. dropout_position="rank" (default)
        trains with the adapters' own (rank-space) dropout, "input" with PEFT's (see the
        class)."""
        adapters = list(adapters)
        cls._check_sources(adapters, LowRankAdapter)
        first = adapters[0]
        _common_value("dropout", [a.dropout for a in adapters])
        bank = cls(first.base, len(adapters), first.rank, [a.alpha for a in adapters],
                   dropout=first.dropout, dropout_position=dropout_position,
                   validate=validate)
        with torch.no_grad():
            for i, a in enumerate(adapters):
                bank.down_weight[i].copy_(a.down_weight)
                bank.up_weight[i].copy_(a.up_weight)
        return bank

    def to_adapters(self) -> list[LowRankAdapter]:
        """One LowRankAdapter per slot, all wrapping the bank's base module (shared, frozen)."""
        out = []
        with torch.no_grad():
            for a in range(self.num_adapters):
                adapter = LowRankAdapter(self.base, self.rank, self.alpha[a], self.dropout)
                adapter.down_weight.copy_(self.down_weight[a])
                adapter.up_weight.copy_(self.up_weight[a])
                out.append(adapter)
        return out

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, dropout={self.dropout}, "
                f"dropout_position={self.dropout_position}")


def _same_base(a: nn.Linear, b: nn.Linear) -> bool:
    """One module, or the same frozen weights and bias."""
    if a is b:
        return True
    if a.weight.shape != b.weight.shape or not torch.equal(a.weight, b.weight):
        return False
    if (a.bias is None) != (b.bias is None):
        return False
    return a.bias is None or torch.equal(a.bias, b.bias)


class RAdapterBank(_FrozenLinearBank):
    """N R-Adapters of ONE frozen linear (N tasks of one base model), applied per sample or per
    row in one op:

        z = base(x);  y[m] = z[m] + c[a] * q_a(z[m])     a = ids[m] >= 0
                      y[m] = z[m]                       ids[m] == -1

    q_a(z) = z W_f[a]^T for rank=None (the full-rank form the shipped R-Adapter runs train:
    full_weight (N, out, out), zero-init; op pyadapt.ops.bank_linear, a grouped GEMM), or
    (z W_d[a]^T) W_u[a]^T for rank=r (down_weight (N, r, out) Xavier-uniform, up_weight
    (N, out, r) zero; op pyadapt.ops.bank with identity activation). c = s in training,
    s * eval_scale in eval (pyadapt.RAdapter's rule); s (N,) a parameter with learn_scale,
    else a float64 buffer. Ids and validate as in AdapterBank.

    Adapter dropping (training, drop_prob > 0) follows pyadapt.RAdapter exactly: whole samples,
    token rows or sequence positions (drop_granularity, batch_first) lose the adapter term and
    the kept ones get it scaled by 1/(1 - drop_prob); the mask is drawn as RAdapter draws it
    (reference.drop_multiplier on torch's default generator, same shape), so the same generator
    state gives the same mask. It costs no extra pass: a dropped row is given id -1 for the op
    (it passes through as z), and the op gets c / (1 - drop_prob), computed in torch so the
    gradient of s flows. One drop_prob for all slots."""

    kind = "radapter"

    def __init__(self, base: nn.Linear, num_adapters: int, rank: Optional[int] = None,
                 scale: float | Sequence[float] = 0.1, *, learn_scale: bool = True,
                 eval_scale: float | Sequence[float] = 0.5, drop_prob: float = 0.0,
                 drop_granularity: str = "sample", batch_first: bool = True,
                 validate: bool = True):
        super().__init__()
        factory = self._init_base(base, num_adapters, validate)
        n = self.num_adapters
        d = base.out_features
        if rank is not None:
            check.positive_int("rank", rank)
            if rank > d:
                raise ValueError(f"rank: expected 1 <= rank <= {d} (out_features of base), or "
                                 f"None for the full-rank adapter; got {rank}")
        self.rank = rank

        def per_adapter(name, v):
            vals = [v] * n if isinstance(v, (int, float)) else list(v)
            if len(vals) != n:
                raise ValueError(f"{name}: expected one value per adapter ({n}), got {len(vals)}")
            return [check.finite(name, x) for x in vals]

        scales = per_adapter("scale", scale)
        self.drop_prob = check.probability("drop_prob", drop_prob)
        self.drop_granularity = check.choice("drop_granularity", drop_granularity,
                                             DROP_GRANULARITIES)
        self.batch_first = bool(batch_first)
        self.learn_scale = bool(learn_scale)
        if rank is None:
            self.full_weight = nn.Parameter(torch.zeros(n, d, d, **factory))
        else:
            self.down_weight = nn.Parameter(torch.empty(n, rank, d, **factory))
            self.up_weight = nn.Parameter(torch.zeros(n, d, rank, **factory))
            with torch.no_grad():
                for a in range(n):
                    nn.init.xavier_uniform_(self.down_weight[a])
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(scales, **factory))
        else:
            self.register_buffer("scale", torch.tensor(scales, dtype=torch.float64,
                                                       device=base.weight.device))
        self.register_buffer("eval_scale", torch.tensor(per_adapter("eval_scale", eval_scale),
                                                        dtype=torch.float64,
                                                        device=base.weight.device))

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        if self.rank is None:
            yield "full_weight", self.full_weight
        else:
            yield "down_weight", self.down_weight
            yield "up_weight", self.up_weight
        if self.learn_scale:
            yield "scale", self.scale

    def forward(self, x: Tensor, adapter_ids: Tensor, validate: Optional[bool] = None) -> Tensor:
        """x (B, ..., in_features); adapter_ids per sample (B,) or per row (x.shape[:-1])."""
        _, ids, z, dtype = self._rows_ids_base(x, adapter_ids, validate)
        s = self._current("scale", self.scale) if self.learn_scale else self.scale
        c = s if self.training else s * self.eval_scale.to(s.dtype)
        if self.training and self.drop_prob > 0.0:
            # RAdapter's draw (its first use of the generator): the same state, the same mask
            kept = reference.drop_multiplier(x.shape, self.drop_granularity, self.drop_prob,
                                             batch_first=self.batch_first, device=x.device) > 0
            ids = torch.where(kept, ids, -1)        # a dropped row passes through: y = z
            c = c * (1.0 / (1.0 - self.drop_prob))  # the kept rows' 1/(1-p), on the scale
        if self.rank is None:
            y = bank_linear(
                z, ids, cast(self._current("full_weight", self.full_weight), dtype), c)
        else:
            y = bank_ops.bank_bottleneck(
                z, ids, cast(self._current("down_weight", self.down_weight), dtype), None,
                cast(self._current("up_weight", self.up_weight), dtype), None, scale=c,
                activation="identity")
        return y.reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def _form(rank: Optional[int]) -> str:
        return "full-rank (rank=None)" if rank is None else f"low-rank (rank={rank})"

    @classmethod
    def from_adapters(cls, adapters: Sequence[RAdapter], *,
                      validate: bool = True) -> "RAdapterBank":
        """A bank holding copies of RAdapters of the same base (one module, or identical
        weights and bias), all full-rank (rank=None) or all low-rank with one rank, with the
        same scale kind (all learnable or all fixed) and the same adapter dropping (drop_prob,
        and with drop_prob > 0 drop_granularity and batch_first); the bank keeps the first
        adapter's base module."""
        adapters = list(adapters)
        if not adapters:
            raise ValueError("adapters: expected at least one adapter")
        first = adapters[0]
        for i, a in enumerate(adapters):
            if not isinstance(a, RAdapter):
                raise TypeError(f"adapters[{i}]: expected a pyadapt.RAdapter, got "
                                f"{type(a).__name__}")
            if (a.rank is None) != (first.rank is None):
                raise ValueError(f"adapters[{i}]: is {cls._form(a.rank)} but adapters[0] is "
                                 f"{cls._form(first.rank)}; a bank holds one form, full-rank "
                                 f"and low-rank R-Adapters cannot be mixed")
        cls._check_sources(adapters, RAdapter)
        learn = isinstance(first.scale, torch.Tensor)
        _common_value("drop_prob", [a.drop_prob for a in adapters])
        for i, a in enumerate(adapters):
            if isinstance(a.scale, torch.Tensor) != learn:
                raise ValueError(f"adapters[{i}]: expected a {'learnable' if learn else 'fixed'} "
                                 f"scale (as adapters[0])")
            if first.drop_prob > 0.0 and ((a.drop_granularity, a.batch_first)
                                          != (first.drop_granularity, first.batch_first)):
                raise ValueError(f"adapters[{i}]: expected drop_granularity "
                                 f"{first.drop_granularity!r}, batch_first {first.batch_first} "
                                 f"(as adapters[0]), got {a.drop_granularity!r}, "
                                 f"{a.batch_first}")
        bank = cls(first.base, len(adapters), first.rank,
                   [float(a.scale.detach()) if learn else a.scale for a in adapters],
                   learn_scale=learn, eval_scale=[a.eval_scale for a in adapters],
                   drop_prob=first.drop_prob, drop_granularity=first.drop_granularity,
                   batch_first=first.batch_first, validate=validate)
        with torch.no_grad():
            for i, a in enumerate(adapters):
                for name, t in a.adapter_tensors():
                    getattr(bank, name)[i].copy_(t)
        return bank

    @classmethod
    def from_state_dicts(cls, base: nn.Linear, state_dicts: Sequence[dict], *,
                         scale: float | Sequence[float] = 0.1,
                         eval_scale: float | Sequence[float] = 0.5, drop_prob: float = 0.0,
                         drop_granularity: str = "sample", batch_first: bool = True,
                         validate: bool = True) -> "RAdapterBank":
        """A bank over `base` from saved R-Adapters: each state dict is
        pyadapt.adapter_state_dict of one RAdapter of this projection: full_weight (full
        rank) or down_weight + up_weight (low rank), and scale when it was learnable, possibly
        under one common prefix ("visual.transformer.resblocks.3.mlp.c_proj.full_weight").
        Shapes give the form and rank; what a state dict does not hold (a fixed scale,
        eval_scale, dropping) is given here (one value, or one per state dict)."""
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        state_dicts = list(state_dicts)
        if not state_dicts:
            raise ValueError("state_dicts: expected at least one adapter state dict")
        n = len(state_dicts)

        def per_dict(name, v):
            vals = [v] * n if isinstance(v, (int, float)) else list(v)
            if len(vals) != n:
                raise ValueError(f"{name}: expected one value per state dict ({n}), got "
                                 f"{len(vals)}")
            return vals

        fixed, evals = per_dict("scale", scale), per_dict("eval_scale", eval_scale)
        d = base.out_features
        adapters = []
        for i, sd in enumerate(state_dicts):
            what = f"state_dicts[{i}]"
            if not isinstance(sd, dict):
                raise TypeError(f"{what}: expected a dict of tensors, got {type(sd).__name__}")
            found = {(k[:-len(leaf)], leaf) for k in sd for leaf in ("full_weight",
                                                                      "down_weight")
                     if k.endswith(leaf)}
            if len(found) != 1:
                raise ValueError(f"{what}: expected exactly one '<prefix>full_weight' or "
                                 f"'<prefix>down_weight' key (one RAdapter), found {len(found)}")
            prefix, leaf = found.pop()
            own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            allowed = ({"full_weight"} if leaf == "full_weight"
                       else {"down_weight", "up_weight"}) | {"scale"}
            unexpected = sorted(set(own) - allowed) + sorted(k for k in sd
                                                             if not k.startswith(prefix))
            if unexpected:
                raise ValueError(f"{what}: unexpected keys {unexpected}")
            if leaf == "down_weight" and "up_weight" not in own:
                raise ValueError(f"{what}: missing key {prefix + 'up_weight'!r}")
            for k, v in own.items():
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"{what}[{prefix + k!r}]: expected a tensor, got "
                                    f"{type(v).__name__}")
            rank = None
            if leaf == "down_weight":
                if own["down_weight"].dim() != 2:
                    raise ValueError(f"{what}[{prefix + 'down_weight'!r}]: expected a 2-D "
                                     f"tensor (rank x {d}), got shape "
                                     f"{tuple(own['down_weight'].shape)}")
                rank = own["down_weight"].shape[0]
            learn = "scale" in own
            adapter = RAdapter(base, rank, drop_prob,
                               float(own["scale"]) if learn else fixed[i], learn_scale=learn,
                               eval_scale=evals[i], drop_granularity=drop_granularity,
                               batch_first=batch_first)
            expected = dict(adapter.adapter_tensors())
            for k, v in own.items():
                if tuple(v.shape) != tuple(expected[k].shape):
                    raise ValueError(f"{what}[{prefix + k!r}]: expected shape "
                                     f"{tuple(expected[k].shape)}, got {tuple(v.shape)}")
            with torch.no_grad():
                for k, v in own.items():
                    expected[k].copy_(v)
            adapters.append(adapter)
        return cls.from_adapters(adapters, validate=validate)

    def to_adapters(self) -> list[RAdapter]:
        """One RAdapter per slot, all wrapping the bank's base module (shared, frozen)."""
        out = []
        with torch.no_grad():
            for a in range(self.num_adapters):
                adapter = RAdapter(self.base, self.rank, self.drop_prob, float(self.scale[a]),
                                   learn_scale=self.learn_scale,
                                   eval_scale=float(self.eval_scale[a]),
                                   drop_granularity=self.drop_granularity,
                                   batch_first=self.batch_first)
                for name, t in adapter.adapter_tensors():
                    t.copy_(getattr(self, name)[a])
                out.append(adapter)
        return out

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, "
                f"learn_scale={self.learn_scale}, drop_prob={self.drop_prob}, "
                f"drop_granularity={self.drop_granularity}")


class CPAdapterBank(_FrozenLinearBank):
    """N CP / Tucker (Aurora) adapter sites of ONE frozen linear (the same projection of one
    base model, N tasks each with its own trained pyadapt.CPAdapter), applied per sample or per
    row in one op:

        y[m] = base(x[m]) + ((x[m] A_a^T) K_a) B_a^T     a = ids[m] >= 0
        y[m] = base(x[m])                                ids[m] == -1

    with pyadapt.CPLinear's factors: A_a = blockdiag(U_a) (n_in R x in), B_a = blockdiag(V_a)
    (out x n_out R), K_a built from the core C_a and the site's lambda_a (Tucker) or from
    diag(lambda_a) (CP). Stacked parameters: U (N, R, width), V (N, width, R), C (N, R, R, R)
    for core="tucker", lam (N, n_out, n_in, R). Each slot holds its own copy of its adapter's
    U, V and core (in a CPAdapter they are shared by every site of one task; here the other
    sites are elsewhere, so gradients land on the bank's copies only).

    How it runs: the core is folded, inside autograd, into whichever factor gives the smaller
    rank (one small einsum over the N adapters, no block-diagonal matrix is multiplied): with
    n_in <= n_out, down = A_a and up = B_a K_a^T (rank n_in R); else down = K_a^T A_a and
    up = B_a (rank n_out R). Then the LoRA form of the bank op (pyadapt.ops.bank, identity
    activation, residual = the base output computed once for the batch) runs the grouped
    kernels unchanged, and autograd carries their weight gradients back to U, V, C and lambda.
    The fold runs in the parameters' dtype (autocast off) and is cast to the compute dtype once.

    Ids and validate as in AdapterBank.

    Dropout (training, dropout > 0; eval applies none): the bank op drops the rank-space
    activation between its down and up factors, so the fold follows the site's
    dropout_position: "before_core" drops x A_a^T, hence down = A_a and up = B_a K_a^T (rank
    n_in R); "after_core" drops (x A_a^T) K_a, hence down = K_a^T A_a and up = B_a (rank
    n_out R). Either way the dropped activation has the site's own columns, and the bank op's
    mask (flattened batch row m, column k: philox_uniform(seed, m * r + k) >= p) is exactly the
    mask a CPLinear site draws from the same seed for that row: a batch whose rows all name
    adapter a equals site a called with the same seed. Each call draws a fresh seed (as the
    sites do); without dropout the fold takes the smaller rank (`folded_rank`)."""

    kind = "cp"

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int = 32, core: str = "tucker",
                 *, width: Optional[int] = None, dropout: float = 0.0,
                 dropout_position: str = "after_core", validate: bool = True):
        super().__init__()
        factory = self._init_base(base, num_adapters, validate)
        n = self.num_adapters
        self.width = check.positive_int(
            "width", width if width is not None else min(base.in_features, base.out_features))
        if base.in_features % self.width or base.out_features % self.width:
            raise ValueError(f"width: expected a divisor of in and out features of base "
                             f"({base.in_features} -> {base.out_features}), got {self.width}")
        self.rank = check.positive_int("rank", rank)
        if rank > self.width:
            raise ValueError(f"rank: expected 1 <= rank <= {self.width} (width), got {rank}")
        self.core_kind = check.choice("core", core, CORES)
        self.dropout = check.probability("dropout", dropout)
        self.dropout_position = check.choice("dropout_position", dropout_position,
                                             DROPOUT_POSITIONS)
        self.n_out = base.out_features // self.width
        self.n_in = base.in_features // self.width
        R, w = self.rank, self.width
        self.U = nn.Parameter(torch.empty(n, R, w, **factory))
        self.V = nn.Parameter(torch.zeros(n, w, R, **factory))
        if self.core_kind == "tucker":
            self.C = nn.Parameter(torch.empty(n, R, R, R, **factory))
        else:
            self.register_parameter("C", None)
        self.lam = nn.Parameter(torch.empty(n, self.n_out, self.n_in, R, **factory))
        bound = math.sqrt(6.0 / (R + 4))    # CPLinear's lambda init
        with torch.no_grad():               # each slot starts as a fresh one-site CPAdapter
            for a in range(n):
                nn.init.kaiming_uniform_(self.U[a], a=math.sqrt(5))
                if self.C is not None:
                    nn.init.xavier_uniform_(self.C[a])
            nn.init.uniform_(self.lam, -bound, bound)
        # the bank op's per-adapter scale: CPLinear's delta has scale 1 (not saved: constant)
        self.register_buffer("_unit_scale", torch.ones(n, dtype=torch.float64,
                                                       device=base.weight.device),
                             persistent=False)

    @property
    def folded_rank(self) -> int:
        """Rank of the LoRA-form factors the bank op runs on without dropout:
        R * min(n_in, n_out) (with dropout, see the class: R * n_in or R * n_out)."""
        return self.rank * min(self.n_in, self.n_out)

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield "U", self.U
        yield "V", self.V
        if self.C is not None:
            yield "C", self.C
        yield "lam", self.lam

    def lora_factors(self, dropout_position: Optional[str] = None) -> tuple[Tensor, Tensor]:
        """(down (N, r, in), up (N, out, r)), in the parameters' dtype and differentiable in
        U, V, C, lam: adapter a's delta is (x down[a]^T) up[a]^T. dropout_position None:
        r = folded_rank (the core goes into the factor that keeps r smallest); "before_core":
        the core goes into up (r = n_in R, x down^T = x A^T); "after_core": into down
        (r = n_out R, x down^T = (x A^T) K)."""
        if dropout_position is not None:
            check.choice("dropout_position", dropout_position, DROPOUT_POSITIONS)
        t = {name: self._current(name, p) for name, p in self.adapter_tensors()}
        U, V, lam = t["U"], t["V"], t["lam"]
        with torch.autocast(U.device.type, enabled=False):
            # core blocks m[a, o, i] (R x R): block (i, o) of K_a
            if self.C is not None:
                m = torch.einsum("nabc,noic->noiab", t["C"], lam)
            else:
                m = torch.diag_embed(lam)
            n, R = self.num_adapters, self.rank
            core_into_up = (self.n_in <= self.n_out if dropout_position is None
                            else dropout_position == "before_core")
            if core_into_up:
                eye = torch.eye(self.n_in, dtype=U.dtype, device=U.device)
                down = torch.einsum("ij,naw->niajw", eye, U)
                up = torch.einsum("nwb,noiab->nowia", V, m)
                return (down.reshape(n, self.n_in * R, self.in_features),
                        up.reshape(n, self.out_features, self.n_in * R))
            eye = torch.eye(self.n_out, dtype=U.dtype, device=U.device)
            down = torch.einsum("noiab,naw->nobiw", m, U)
            up = torch.einsum("oq,nwb->nowqb", eye, V)
            return (down.reshape(n, self.n_out * R, self.in_features),
                    up.reshape(n, self.out_features, self.n_out * R))

    def forward(self, x: Tensor, adapter_ids: Tensor, validate: Optional[bool] = None) -> Tensor:
        """x (B, ..., in_features); adapter_ids per sample (B,) or per row (x.shape[:-1])."""
        x2, ids, base_out, dtype = self._rows_ids_base(x, adapter_ids, validate)
        p = self.dropout if self.training else 0.0
        down, up = self.lora_factors(self.dropout_position if p > 0.0 else None)
        y = bank_ops.bank_bottleneck(x2, ids, cast(down, dtype), None, cast(up, dtype), None,
                                     scale=self._unit_scale, residual=base_out,
                                     activation="identity", dropout_p=p)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_adapters(cls, adapters: Sequence[CPLinear | CPAdapter], *,
                      validate: bool = True) -> "CPAdapterBank":
        """A bank holding copies of CP/Tucker sites of the same base (one module, or identical
        weights and bias): each item a CPLinear (a site `cp[i]` of a task's CPAdapter) or a
        CPAdapter with exactly one site. All need the same rank, core kind, width,
        dropout_position and dropout; the bank keeps the first site's base module."""
        adapters = list(adapters)
        if not adapters:
            raise ValueError("adapters: expected at least one adapter")
        sites: list[CPLinear] = []
        for i, a in enumerate(adapters):
            if isinstance(a, CPAdapter):
                if len(a) != 1:
                    raise ValueError(f"adapters[{i}]: a CPAdapter with {len(a)} sites is "
                                     f"ambiguous; pass the site of this projection, cp[k]")
                a = a[0]
            if not isinstance(a, CPLinear):
                raise TypeError(f"adapters[{i}]: expected a pyadapt.CPLinear (or a one-site "
                                f"CPAdapter), got {type(a).__name__}")
            sites.append(a)
        first = sites[0]
        width = first.in_features // first.n_in
        for i, s in enumerate(sites):
            got = {"core": s.core_kind, "width": s.in_features // s.n_in,
                   "dropout_position": s.dropout_position}
            want = {"core": first.core_kind, "width": width,
                    "dropout_position": first.dropout_position}
            for key, value in want.items():
                if got[key] != value:
                    raise ValueError(f"adapters[{i}]: expected {key} {value} (as adapters[0]), "
                                     f"got {got[key]}")
        cls._check_sources(sites, CPLinear)
        bank = cls(first.base, len(sites), first.rank, first.core_kind, width=width,
                   dropout=_common_value("dropout", [s.dropout for s in sites]),
                   dropout_position=first.dropout_position, validate=validate)
        with torch.no_grad():
            for i, s in enumerate(sites):
                bank.U[i].copy_(s.U)
                bank.V[i].copy_(s.V)
                if bank.C is not None:
                    bank.C[i].copy_(s.C)
                bank.lam[i].copy_(s.lam)
        return bank

    def to_adapters(self) -> list[CPLinear]:
        """One CPLinear per slot, each the only site of a new CPAdapter (its own U, V, core:
        copies of the slot's), all wrapping the bank's base module (shared, frozen). A site
        keeps its owner's parameters, not the owner: use `site.U` etc. to train them."""
        out = []
        with torch.no_grad():
            for a in range(self.num_adapters):
                owner = CPAdapter([self.base], self.rank, self.core_kind, self.dropout,
                                  dropout_position=self.dropout_position, width=self.width)
                site = owner[0]
                site.U.copy_(self.U[a])
                site.V.copy_(self.V[a])
                if self.C is not None:
                    site.C.copy_(self.C[a])
                site.lam.copy_(self.lam[a])
                out.append(site)
        return out

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}, core={self.core_kind}, "
                f"blocks={self.n_out}x{self.n_in}, folded_rank={self.folded_rank}")
