"""Adapters on a frozen nn.Linear: RAdapter (R-Adapter), LowRankAdapter (LoRA form) and
CPAdapter (Aurora's mode approximation: U, V, core shared by every site, per-site lambda), plus
Aurora's two small modules (gated query transformation, informative context enhancement).

Each wraps its base linear, computes base and adapter as one op, and can be folded into the
base weight (`pyadapt.fold_`), after which its forward is the plain base linear."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from . import _validate as check
from . import ops
from . import reference
from ._module import AdapterModule, cast, compute_dtype, rows

Tensor = torch.Tensor

DROP_GRANULARITIES = ("sample", "row", "position")
CORES = ("tucker", "cp")
DROPOUT_POSITIONS = ("after_core", "before_core")


@dataclass
class FoldTerm:
    """target (a base parameter) becomes round(target + scale * left @ right); `matrix` is the
    2-D view of target the product adds to."""
    target: Tensor
    matrix: Tensor
    left: Tensor
    right: Tensor
    scale: float


def _check_base(base) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
    return base


class _FoldableLinear(AdapterModule):
    """A frozen base linear plus an adapter that folds into it."""

    base: nn.Linear

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.merged = False
        self._saved_base: Optional[list[Tensor]] = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _for_fold(self, name: str, t: Tensor, use_ema: bool) -> Tensor:
        if use_ema:
            return self._ema_shadow[name]
        return t.detach()

    def fold_terms(self, alpha: float, use_ema: bool) -> list[FoldTerm]:
        raise TypeError(f"{type(self).__name__} does not define fold_terms")

    def _base_forward_if_merged(self, x: Tensor) -> Optional[Tensor]:
        if self.merged:
            rows("x", x, self.in_features, "in_features")
            return self.base(x)
        return None

    def _acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.base.weight.dtype == torch.float64 else torch.float32


class RAdapter(_FoldableLinear):
    """R-Adapter on the output of a frozen linear: y = z + c * drop(q), z = base(x),
    q = z W_f^T (rank=None: full out x out, zero-init) or (z W_d^T) W_u^T (rank r: W_d
    Xavier-uniform, W_u zero). c = s in training, s * eval_scale in eval; s learnable (init
    `scale`) unless learn_scale=False.

    Adapter dropping (training, drop_prob > 0) zeroes q for whole samples ("sample", the paper),
    single token rows ("row"), or sequence positions shared by the batch ("position", what the
    official code does); kept ones are scaled by 1/(1 - drop_prob). batch_first says whether
    inputs are (batch, tokens, d) or (tokens, batch, d)."""

    def __init__(self, base: nn.Linear, rank: Optional[int] = None, drop_prob: float = 0.0,
                 scale: float = 0.1, learn_scale: bool = True, eval_scale: float = 0.5,
                 drop_granularity: str = "sample", *, batch_first: bool = True):
        super().__init__(_check_base(base))
        d = base.out_features
        if rank is not None:
            check.positive_int("rank", rank)
            if rank > d:
                raise ValueError(f"rank: expected 1 <= rank <= {d} (out_features of base), or "
                                 f"None for the full-rank adapter; got {rank}")
        self.rank = rank
        self.drop_prob = check.probability("drop_prob", drop_prob)
        self.eval_scale = check.finite("eval_scale", eval_scale)
        self.drop_granularity = check.choice("drop_granularity", drop_granularity,
                                             DROP_GRANULARITIES)
        self.batch_first = bool(batch_first)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if rank is None:
            self.full_weight = nn.Parameter(torch.zeros(d, d, **factory))
        else:
            self.down_weight = nn.Parameter(torch.empty(rank, d, **factory))
            self.up_weight = nn.Parameter(torch.zeros(d, rank, **factory))
            nn.init.xavier_uniform_(self.down_weight)
        scale = check.finite("scale", scale)
        # A fixed scale stays a Python float (exact: a float32 buffer would round it).
        self.scale = nn.Parameter(torch.tensor(scale, **factory)) if learn_scale else scale

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        names = ("full_weight",) if self.rank is None else ("down_weight", "up_weight")
        if isinstance(self.scale, nn.Parameter):
            names += ("scale",)
        for name in names:
            yield name, getattr(self, name)

    def forward(self, x: Tensor) -> Tensor:
        merged = self._base_forward_if_merged(x)
        if merged is not None:
            return merged
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.base.weight, "base.weight")
        row_scale = None
        if self.training and self.drop_prob > 0.0:
            row_scale = reference.drop_multiplier(x.shape, self.drop_granularity, self.drop_prob,
                                                  batch_first=self.batch_first, dtype=dtype,
                                                  device=x.device)
        s = self.scale if isinstance(self.scale, float) else self._current("scale", self.scale)
        c = s if self.training else s * self.eval_scale
        if self.rank is None:
            factors = {"full_weight": cast(self._current("full_weight", self.full_weight), dtype)}
        else:
            factors = {"down_weight": cast(self._current("down_weight", self.down_weight), dtype),
                       "up_weight": cast(self._current("up_weight", self.up_weight), dtype)}
        y = ops.radapter(cast(x2, dtype), cast(self.base.weight, dtype),
                         cast(self.base.bias, dtype), scale=c, row_scale=row_scale, **factors)
        return y.reshape(*x.shape[:-1], self.out_features)

    def fold_terms(self, alpha: float, use_ema: bool) -> list[FoldTerm]:
        """W_rep = (I + s' W_f) W_o and b_rep = (I + s' W_f) b_o, s' = s * eval_scale * alpha."""
        acc = self._acc_dtype()
        s = self.scale
        if isinstance(s, nn.Parameter):
            s = float(self._for_fold("scale", s, use_ema))
        s = s * self.eval_scale * alpha
        w_o = self.base.weight.detach()
        b_o = self.base.bias
        down = None
        if self.rank is None:
            left = self._for_fold("full_weight", self.full_weight, use_ema).to(acc)
        else:
            left = self._for_fold("up_weight", self.up_weight, use_ema).to(acc)
            down = self._for_fold("down_weight", self.down_weight, use_ema).to(acc)

        def project(t: Tensor) -> Tensor:  # the right factor: W_o itself, or W_d W_o
            return t.to(acc) if down is None else down @ t.to(acc)

        terms = [FoldTerm(self.base.weight, w_o, left, project(w_o), s)]
        if b_o is not None:
            b_col = b_o.detach().view(-1, 1)
            terms.append(FoldTerm(b_o, b_col, left, project(b_col), s))
        return terms

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, drop_prob={self.drop_prob}, eval_scale={self.eval_scale}, "
                f"drop_granularity={self.drop_granularity}, merged={self.merged}")


class LowRankAdapter(_FoldableLinear):
    """LoRA form fused with its base: y = base(x) + (alpha / rank) * drop(x A^T) B^T, with A
    (rank x in, Kaiming-uniform) and B (out x rank, zero). Dropout acts in the rank space (so the
    whole layer stays one fused op); PEFT's dropout on x is not offered."""

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16, dropout: float = 0.0):
        super().__init__(_check_base(base))
        check.positive_int("rank", rank)
        limit = min(base.in_features, base.out_features)
        if rank > limit:
            raise ValueError(f"rank: expected 1 <= rank <= {limit} (min(in_features, "
                             f"out_features) of base), got {rank}")
        self.rank = rank
        self.alpha = check.finite("alpha", alpha)
        self.dropout = check.probability("dropout", dropout)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down_weight = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.up_weight = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield "down_weight", self.down_weight
        yield "up_weight", self.up_weight

    def forward(self, x: Tensor) -> Tensor:
        merged = self._base_forward_if_merged(x)
        if merged is not None:
            return merged
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.base.weight, "base.weight")
        y = ops.lowrank_linear(
            cast(x2, dtype), cast(self.base.weight, dtype), cast(self.base.bias, dtype),
            cast(self._current("down_weight", self.down_weight), dtype), None,
            cast(self._current("up_weight", self.up_weight), dtype), scale=self.scaling,
            dropout_p=self.dropout if self.training else 0.0)
        return y.reshape(*x.shape[:-1], self.out_features)

    def fold_terms(self, alpha: float, use_ema: bool) -> list[FoldTerm]:
        """W' = W + alpha * (lora_alpha / rank) * B A."""
        acc = self._acc_dtype()
        left = self._for_fold("up_weight", self.up_weight, use_ema).to(acc)
        right = self._for_fold("down_weight", self.down_weight, use_ema).to(acc)
        return [FoldTerm(self.base.weight, self.base.weight.detach(), left, right,
                         self.scaling * alpha)]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"


class CPLinear(_FoldableLinear):
    """One site of a CPAdapter: its frozen base, its lambda (n_out x n_in x R: one vector per
    width-sized block of the weight) and the adapter's shared U, V, core (the same Parameter
    objects in every site, so their gradients add up over sites)."""

    def __init__(self, base: nn.Linear, owner: "CPAdapter"):
        super().__init__(base)
        w = owner.width
        self.n_out, self.n_in = base.out_features // w, base.in_features // w
        self.rank = owner.rank
        self.core_kind = owner.core_kind
        self.dropout = owner.dropout
        self.dropout_position = owner.dropout_position
        self.U = owner.U
        self.V = owner.V
        if owner.C is not None:
            self.C = owner.C
        else:
            self.register_parameter("C", None)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lam = nn.Parameter(torch.empty(self.n_out, self.n_in, self.rank, **factory))
        bound = math.sqrt(6.0 / (self.rank + 4))  # as Xavier on the official (R x 4) lambda table
        nn.init.uniform_(self.lam, -bound, bound)

    def adapter_tensors(self) -> Iterator[tuple[str, Tensor]]:
        yield "lam", self.lam
        yield "U", self.U
        yield "V", self.V
        if self.C is not None:
            yield "C", self.C

    def factors(self, use: Optional[dict] = None) -> tuple[Tensor, Tensor, Tensor]:
        """(A, K, B) of the op: A = blockdiag(U) (n_in R x in), B = blockdiag(V) (out x n_out R),
        K (n_in R x n_out R) whose block (j, i) is M_ij = C x_3 lambda_ij (or diag(lambda_ij))."""
        t = use if use is not None else {n: self._current(n, p) for n, p in self.adapter_tensors()}
        lam, U, V = t["lam"], t["U"], t["V"]
        R = self.rank
        if self.core_kind == "tucker":
            m = torch.einsum("abc,oic->oiab", t["C"], lam)
        else:
            m = torch.diag_embed(lam)
        k = m.permute(1, 2, 0, 3).reshape(self.n_in * R, self.n_out * R)
        a = U if self.n_in == 1 else torch.block_diag(*([U] * self.n_in))
        b = V if self.n_out == 1 else torch.block_diag(*([V] * self.n_out))
        return a, k, b

    def forward(self, x: Tensor) -> Tensor:
        merged = self._base_forward_if_merged(x)
        if merged is not None:
            return merged
        x2 = rows("x", x, self.in_features, "in_features")
        dtype = compute_dtype(x, self.base.weight, "base.weight")
        a, k, b = self.factors()
        y = ops.lowrank_linear(
            cast(x2, dtype), cast(self.base.weight, dtype), cast(self.base.bias, dtype),
            cast(a, dtype), cast(k, dtype), cast(b, dtype), scale=1.0,
            dropout_p=self.dropout if self.training else 0.0,
            dropout_after_core=self.dropout_position == "after_core")
        return y.reshape(*x.shape[:-1], self.out_features)

    def fold_terms(self, alpha: float, use_ema: bool) -> list[FoldTerm]:
        """W' = W + alpha * B K^T A, i.e. block (i, j) gains V M_ij^T U."""
        acc = self._acc_dtype()
        use = {n: self._for_fold(n, p, use_ema).to(acc) for n, p in self.adapter_tensors()}
        a, k, b = self.factors(use)
        return [FoldTerm(self.base.weight, self.base.weight.detach(), b, k.T @ a, alpha)]

    def extra_repr(self) -> str:
        return (f"blocks={self.n_out}x{self.n_in}, rank={self.rank}, core={self.core_kind}, "
                f"merged={self.merged}")


class CPAdapter(nn.Module):
    """Aurora's mode-approximation adapter over many frozen linears ("sites").

    U (R x width, nn.Linear's default init), V (width x R, zero) and, for core="tucker", a core
    C (R x R x R, Xavier-uniform) are shared by every site; each site k has its own lambda.
    Site k computes y = x W_k^T + b_k + dropout(x U^T M_k) V^T with M_k = C x_3 lambda_k
    ("tucker", the official code) or diag(lambda_k) ("cp", the paper); dropout_position
    "after_core" (Aurora's ViT) or "before_core" (its BERT). A base whose in or out features are
    a multiple of `width` (Aurora's fc1/fc2) is split into width-sized blocks, each with its own
    lambda. Use `cp[i]` (a CPLinear) in place of bases[i] in the model."""

    def __init__(self, bases: Sequence[nn.Linear], rank: int = 32, core: str = "tucker",
                 dropout: float = 0.1, *, dropout_position: str = "after_core",
                 width: Optional[int] = None):
        super().__init__()
        bases = list(bases)
        if not bases:
            raise ValueError("bases: expected at least one nn.Linear")
        for i, b in enumerate(bases):
            if not isinstance(b, nn.Linear):
                raise TypeError(f"bases[{i}]: expected an nn.Linear, got {type(b).__name__}")
            if b.weight.dtype != bases[0].weight.dtype or b.weight.device != bases[0].weight.device:
                raise TypeError(f"bases[{i}]: expected dtype {bases[0].weight.dtype} on "
                                f"{bases[0].weight.device} (those of bases[0])")
        dims = [d for b in bases for d in (b.in_features, b.out_features)]
        self.width = check.positive_int("width", width if width is not None else min(dims))
        for i, b in enumerate(bases):
            if b.in_features % self.width or b.out_features % self.width:
                raise ValueError(f"bases[{i}]: expected in and out features that are multiples "
                                 f"of width={self.width}, got {b.in_features} -> {b.out_features}")
        self.rank = check.positive_int("rank", rank)
        if rank > self.width:
            raise ValueError(f"rank: expected 1 <= rank <= {self.width} (width), got {rank}")
        self.core_kind = check.choice("core", core, CORES)
        self.dropout = check.probability("dropout", dropout)
        self.dropout_position = check.choice("dropout_position", dropout_position,
                                             DROPOUT_POSITIONS)
        factory = {"device": bases[0].weight.device, "dtype": bases[0].weight.dtype}
        self.U = nn.Parameter(torch.empty(rank, self.width, **factory))
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        self.V = nn.Parameter(torch.zeros(self.width, rank, **factory))
        if self.core_kind == "tucker":
            self.C = nn.Parameter(torch.empty(rank, rank, rank, **factory))
            nn.init.xavier_uniform_(self.C)
        else:
            self.register_parameter("C", None)
        self.sites = nn.ModuleList(CPLinear(b, self) for b in bases)

    def __getitem__(self, i: int) -> CPLinear:
        return self.sites[i]

    def __len__(self) -> int:
        return len(self.sites)

    def site(self, i: int) -> CPLinear:
        return self.sites[i]


class GatedQueryTransform(AdapterModule):
    """Aurora's gated query transformation: returns weight * (a * gamma + beta), the term added
    to a layer output (gamma, beta per channel, init normal(0, 2e-4))."""

    def __init__(self, dim: int, weight: float = 0.1, *, device=None, dtype=None):
        super().__init__()
        check.positive_int("dim", dim)
        self.weight = check.finite("weight", weight)
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        nn.init.normal_(self.gamma, std=2e-4)
        nn.init.normal_(self.beta, std=2e-4)

    def forward(self, a: Tensor) -> Tensor:
        check.tensor("a", a, min_ndim=1)
        check.last_dim("a", a, self.gamma.shape[0], "dim")
        return reference.gated_query(a, self._current("gamma", self.gamma),
                                     self._current("beta", self.beta), self.weight)


class ContextEnhancement(nn.Module):
    """Aurora's informative context enhancement: cls + weight * (batch mean of text CLS)."""

    def __init__(self, weight: float = 0.1):
        super().__init__()
        self.weight = check.finite("weight", weight)

    def forward(self, cls_positive: Tensor, text_cls: Tensor) -> Tensor:
        check.tensor("cls_positive", cls_positive, ndim=2)
        check.tensor("text_cls", text_cls, ndim=2)
        check.last_dim("text_cls", text_cls, cls_positive.shape[-1], "width of cls_positive")
        return reference.context_enhance(cls_positive, text_cls, self.weight)

