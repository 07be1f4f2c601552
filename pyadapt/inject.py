"""Put pyadapt adapters into any nn.Module by module name.

    pyadapt.inject(vit, r"attn\\.qkv$", "lora", rank=8)                 # wrap matching nn.Linear
    pyadapt.inject(bert, r"attention\\.self\\.(query|value)$",
                   functools.partial(pyadapt.LowRankAdapter, rank=8))
    pyadapt.inject(vit, r"^blocks\\.\\d+$", "bottleneck", bottleneck=16)  # y = adapter(block(x))

Adapters that wrap a linear ("r-adapter", "lora", "cp") replace each matching nn.Linear in its
parent; "cp" builds ONE CPAdapter over every matched linear, so U, V and the core are shared by
all sites. "bottleneck" appends a FusedAdapter after each matching module: it becomes a child
named `pyadapt_adapter` of that module and a forward hook maps the module's output y to
adapter(y) (for a tuple output, as Hugging Face layers return, only element 0), so the
backbone's own parameter names do not change. Its width is the matched module's out_features
(an nn.Linear) or that of the module's last nn.Linear (timm Block: mlp.fc2; BertLayer:
output.dense), unless in_features is given; device and dtype follow the module's parameters.
A wrapped linear's parameters move under `<name>.base`, as the wrapper classes hold them.

freeze=True (the default) leaves trainable only the adapter tensors of the model's pyadapt
adapters (this call's and earlier ones'); every other parameter gets requires_grad=False.

A call whose target is a regex string (or compiled pattern) and whose adapter is a named kind,
a pyadapt adapter class, or a functools.partial of one with JSON-describable arguments is
recorded on the model (pyadapt._placement), so `pyadapt.save_adapters` can store it and
`pyadapt.load_adapters` can replay it on a fresh model. Other callables still work, but their
checkpoints hold tensors only (the adapters must be injected again before loading).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _placement
from ._module import AdapterModule
from .adapters import FusedAdapter
from .linear import CPAdapter, LowRankAdapter, RAdapter

KIND = "inject"
APPENDED = "pyadapt_adapter"

# Canonical kind -> adapter class; aliases map spellings users reach for onto the kinds.
KINDS: Dict[str, type] = {"r-adapter": RAdapter, "lora": LowRankAdapter, "cp": CPAdapter,
                          "bottleneck": FusedAdapter}
ALIASES = {"r-adapter": "r-adapter", "radapter": "r-adapter", "r_adapter": "r-adapter",
           "lora": "lora", "lowrank": "lora", "low-rank": "lora", "low_rank": "lora",
           "cp": "cp", "aurora": "cp", "tucker": "cp",
           "bottleneck": "bottleneck", "fused": "bottleneck", "houlsby": "bottleneck"}
LINEAR_KINDS = ("r-adapter", "lora", "cp")

Target = Union[str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]


@dataclass
class InjectSummary:
    """What inject did: the matched module names (`sites`), the adapter kind, parameter counts
    of the whole model afterwards, whether the call was recorded for checkpoint replay (`note`
    says why not), and the adapters built (one per site; for "cp" the single CPAdapter, whose
    `cp[i]` sits at sites[i])."""
    sites: List[str]
    kind: str
    trainable_parameters: int
    total_parameters: int
    recorded: bool
    note: str = ""
    adapters: List[nn.Module] = field(default_factory=list, repr=False)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)

    def __str__(self) -> str:
        return (f"pyadapt.inject: {self.kind} at {len(self.sites)} site(s); trainable "
                f"{self.trainable_parameters:,} of {self.total_parameters:,} parameters "
                f"({100 * self.trainable_fraction:.3f}%)" + (f"; {self.note}" if self.note else ""))


@dataclass
class _Factory:
    kind: Optional[str]               # canonical kind, or None for an opaque callable
    build: Callable[..., nn.Module]   # build(linear or module, name); "cp": build(list of linears)
    kwargs: Optional[Dict[str, Any]]  # JSON-describable arguments, or None when not describable


def _describable(kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """kwargs as JSON, or None when a JSON round trip would not give them back (a module, a
    dtype, a tuple, ...): then the call cannot be replayed from a checkpoint."""
    try:
        back = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError):
        return None
    return back if back == kwargs else None


def _appended_width(module: nn.Module, name: str) -> int:
    """The width a FusedAdapter after `module` works on: an nn.Linear's out_features, else the
    out_features of the module's last nn.Linear (timm Block: mlp.fc2, BertLayer: output.dense)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"target: cannot tell the width of {name!r} ({type(module).__name__} "
                         f"has no nn.Linear); pass in_features=... for the bottleneck adapter")
    return last.out_features


def _factory_of_class(cls: type, args: tuple, kwargs: Dict[str, Any]) -> _Factory:
    kind = next(k for k, c in KINDS.items() if c is cls)
    sig = inspect.signature(cls)
    try:
        if kind in LINEAR_KINDS:
            bound = sig.bind_partial(None, *args, **kwargs)  # the base (or bases) comes later
            first = next(iter(sig.parameters))
            bound.arguments.pop(first)
        else:
            bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"adapter: arguments do not fit {cls.__name__}: {exc}") from None
    full = dict(bound.arguments)
    return _named_factory(kind, full, describable=_describable(full))


def _named_factory(kind: str, kwargs: Dict[str, Any],
                   describable: Optional[Dict[str, Any]] = None) -> _Factory:
    cls = KINDS[kind]
    if kind == "bottleneck":
        def build(module: nn.Module, name: str) -> nn.Module:
            extra = dict(kwargs)
            extra.setdefault("in_features", _appended_width(module, name))
            p = next(module.parameters(), None)
            if p is not None:
                extra.setdefault("device", p.device)
                extra.setdefault("dtype", p.dtype)
            return cls(**extra)
    elif kind == "cp":
        def build(bases: List[nn.Linear], name: str = "") -> nn.Module:
            return cls(bases, **kwargs)
    else:
        def build(base: nn.Linear, name: str = "") -> nn.Module:
            return cls(base, **kwargs)
    return _Factory(kind, build, describable)


def _resolve_adapter(adapter, kwargs: Dict[str, Any]) -> _Factory:
    if isinstance(adapter, str):
        key = adapter.lower()
        if key not in ALIASES:
            raise ValueError(f"adapter: unknown kind {adapter!r}; expected one of "
                             f"{sorted(ALIASES)} or a factory callable")
        kind = ALIASES[key]
        return _factory_of_class(KINDS[kind], (), kwargs)
    if kwargs:
        raise TypeError(f"inject: keyword arguments {sorted(kwargs)} are only accepted with a "
                        f"named adapter kind; bind them into the factory instead "
                        f"(functools.partial)")
    if isinstance(adapter, type) and adapter in KINDS.values():
        return _factory_of_class(adapter, (), {})
    if isinstance(adapter, functools.partial) and adapter.func in KINDS.values():
        return _factory_of_class(adapter.func, adapter.args, dict(adapter.keywords))
    if callable(adapter):
        return _Factory(None, lambda module, name="": adapter(module), None)
    raise TypeError(f"adapter: expected a kind name ({sorted(KINDS)}), a pyadapt adapter class, "
                    f"a functools.partial of one, or a callable; got {type(adapter).__name__}")


def _matcher(target) -> Tuple[Callable[[str, nn.Module], bool], Optional[Dict[str, Any]]]:
    """(predicate, JSON description or None)."""
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as exc:
            raise ValueError(f"target: invalid regular expression {target!r}: {exc}") from None
        target = pattern
    if isinstance(target, re.Pattern):
        pattern = target
        return (lambda name, m: pattern.search(name) is not None,
                {"target": pattern.pattern, "flags": int(pattern.flags & ~re.UNICODE)})
    if callable(target):
        return (lambda name, m: bool(target(name, m))), None
    raise TypeError(f"target: expected a regex string, a compiled pattern or a callable(name, "
                    f"module) -> bool; got {type(target).__name__}")


def _adapter_subtrees(model: nn.Module) -> List[str]:
    """Names of modules that are (parts of) pyadapt adapters: never injection targets."""
    roots = []
    for name, m in model.named_modules():
        if isinstance(m, (AdapterModule, CPAdapter)):
            roots.append(name)
        elif name.rsplit(".", 1)[-1] == APPENDED:
            roots.append(name)
    return roots


def _inside(name: str, roots: List[str]) -> bool:
    return any(name == r or name.startswith(r + ".") or r == "" for r in roots)


def _parent_and_child(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _apply_appended_adapter(module: nn.Module, args, output):
    """Forward hook of a module carrying an appended adapter: output -> adapter(output)."""
    adapter = module._modules[APPENDED]
    if isinstance(output, torch.Tensor):
        return adapter(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (adapter(output[0]),) + tuple(output[1:])
    raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; the appended "
                    f"pyadapt adapter expects a tensor or a tuple whose first item is a tensor")


def _set_trainable(model: nn.Module) -> None:
    adapter_tensors = set()
    for m in model.modules():
        if isinstance(m, AdapterModule):
            adapter_tensors.update(id(t) for _, t in m.adapter_tensors())
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_tensors)


def _mha_out_proj(model: nn.Module, name: str) -> bool:
    parent, child = _parent_and_child(model, name)
    return isinstance(parent, nn.MultiheadAttention) and child == "out_proj"


def inject(model: nn.Module, target: Target, adapter: Any = "lora", *, freeze: bool = True,
           **adapter_kwargs) -> InjectSummary:
    """Attach adapters to every module of `model` whose qualified name matches `target`.

    target: a regex (searched in the name, re.search: anchor it with ^ and $ as needed), a
    compiled pattern, or a callable(name, module) -> bool. adapter: "r-adapter", "lora", "cp"
    or "bottleneck" with keyword arguments for the class (RAdapter, LowRankAdapter, CPAdapter,
    FusedAdapter), the class itself, a functools.partial of it, or any callable that maps a
    matched module to its replacement (a returned FusedAdapter is appended after the module
    instead). Linear kinds consider only nn.Linear modules; modules inside pyadapt adapters are
    never targets. Builds every adapter before changing the model, so a failing call leaves
    the model as it was. Returns an InjectSummary."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    matches, description = _matcher(target)
    factory = _resolve_adapter(adapter, adapter_kwargs)
    excluded = _adapter_subtrees(model)
    linear_only = factory.kind in LINEAR_KINDS
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and not _inside(n, excluded)
                  and (not linear_only or isinstance(m, nn.Linear))]
    matched = [(n, m) for n, m in candidates if matches(n, m)]
    if not matched:
        what = f"pattern {description['target']!r}" if description else "the target callable"
        names = [n for n, _ in candidates]
        # Compare the pattern without regex syntax (escapes, anchors) to the names.
        plain = re.sub(r"\\(.)", r"\1", description["target"]).strip("^$") if description else ""
        close = difflib.get_close_matches(plain, names, n=8, cutoff=0.3) or names[:8]
        among = "nn.Linear modules" if linear_only else "modules"
        raise ValueError(f"target: {what} matched none of the {len(names)} {among} of "
                         f"{type(model).__name__}; closest names: {close}")
    if linear_only:
        bad = [n for n, _ in matched if _mha_out_proj(model, n)]
        if bad:
            raise ValueError(f"target: {bad} are out_proj of nn.MultiheadAttention, which reads "
                             f"out_proj.weight directly, so a wrapper would be bypassed; use "
                             f"pyadapt.integrations.open_clip for open_clip / CLIP models")

    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        # Build everything first: nothing in the model changes until all factories succeeded.
        if factory.kind == "cp":
            group = factory.build([m for _, m in matched])
            built = [(n, m, group[i]) for i, (n, m) in enumerate(matched)]
            keep = [group]
        else:
            built = [(n, m, factory.build(m, n)) for n, m in matched]
            keep = [b for _, _, b in built]
        for n, m, new in built:
            if not isinstance(new, nn.Module):
                raise TypeError(f"adapter: the factory returned {type(new).__name__} for {n!r}; "
                                f"expected an nn.Module")
            if isinstance(new, FusedAdapter) and APPENDED in m._modules:
                raise ValueError(f"target: {n!r} already carries an appended adapter")
    except Exception:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        raise

    # Deepest first, so a replacement inside a matched block lands before the block moves.
    for n, m, new in sorted(built, key=lambda t: -t[0].count(".")):
        if isinstance(new, FusedAdapter):
            m.add_module(APPENDED, new)
            m.register_forward_hook(_apply_appended_adapter)
        else:
            parent, child = _parent_and_child(model, n)
            setattr(parent, child, new)
    if freeze:
        _set_trainable(model)

    kind = factory.kind or "callable"
    recorded = description is not None and factory.kwargs is not None
    note = ""
    if recorded:
        _placement.record(model, KIND, {**description, "adapter": factory.kind,
                                        "kwargs": factory.kwargs, "freeze": bool(freeze)})
    else:
        why = ("target is a callable" if description is None else
               "the adapter factory cannot be described in JSON")
        note = f"not recorded ({why}): checkpoints of this model hold tensors only"
        _placement.unreplayable(model, f"inject at {[n for n, _ in matched][:3]}...: {why}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectSummary([n for n, _ in matched], kind, trainable, total, recorded, note, keep)


def _replay(model: nn.Module, target: str, adapter: str, kwargs: Dict[str, Any],
            freeze: bool = True, flags: int = 0) -> None:
    inject(model, re.compile(target, flags), adapter, freeze=freeze, **kwargs)


_placement.register(KIND, _replay)
