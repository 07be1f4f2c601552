"""Load adapter tensors saved by the official MMA and R-Adapter code into pyadapt modules.

    sd = torch.load("model-best.pth.tar")["state_dict"]           # official MMA (Dassl)
    pyadapt.integrations.load_official(model, sd, method="mma")   # model holds a MultiModalAdapter

Names the official code gives its adapter tensors (REFERENCE-SEMANTICS.md 1.1 and 2.1-2.4):

MMA (ZjjConan/Multi-Modal-Adapter, the AdapterLearner's state dict), for block index i
(1-based, 0 = embedding level; pyadapt's MultiModalAdapter uses the same indices):
    visual_adapter.{i}.down.0.{weight,bias}   -> mma.vision(i).down     (d_v -> r)
    visual_adapter.{i}.up.{weight,bias}       -> mma.vision(i).up       (r -> d_v)
    text_adapter.{i}.down.0 / .up             -> mma.text(i).down / .up
    shared_adapter.{i}.0.{weight,bias}        -> mma.shared[i]          (r -> r, both towers)

R-Adapter (tjddus9597/R-Adapter-ECCV2024): each residual block B carries StochasticAdapters
next to its frozen linears; pyadapt wraps those linears instead:
    B.adapter_attn.f.weight (d x d)            -> B.attn.out_proj.full_weight  (or B.attn.proj)
    B.adapter_attn.d.weight, .u.weight         -> .down_weight, .up_weight     (low rank)
    B.adapter_attn.s (shape (1,))              -> .scale (0-dim)
    B.adapter_mlp.*                            -> B.mlp.c_proj.*               (or B.mlp.fc2)
    B.adapter_attn_cache.*, B.adapter_mlp_cache.*  (the EMA copies) -> the AdapterEMA shadows
A low-rank official pair loaded into a full-rank pyadapt RAdapter becomes W_f = W_u W_d
(formed in float64); a full official matrix cannot go into a low-rank RAdapter.

Rules: a key belongs to the adapters when one of its dot-separated components names an official
adapter module (MMA: visual_adapter, text_adapter, shared_adapter; R-Adapter: adapter_*, the
components the official code trains); other keys (backbone weights, MMA's token_embedding /
tokenized_prompts buffers) are ignored and listed in the result. An adapter key that maps to no
pyadapt tensor is unknown, and a pyadapt adapter tensor that gets no value is missing: both are
a ValueError listing the names (strict=True). Every shape is checked before anything is copied,
so a failing call changes nothing. Leading name components the model does not have (a
"module." from DataParallel, an "adapter_learner." or "image_encoder.model." wrapper) are
dropped. The scales the official configs set (MMA's ADAPTER_SCALE, R-Adapter's eval_scale) are
not in the checkpoints: build the pyadapt modules with the same values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..adapters import MultiModalAdapter
from ..fold import _adapter_modules, _named_adapter_tensors
from ..linear import RAdapter

Tensor = torch.Tensor

METHODS = ("mma", "r-adapter")
# Where pyadapt's RAdapter sits for each official site: open_clip / OpenAI CLIP names first,
# then timm's.
R_ADAPTER_SITES: Dict[str, Tuple[str, ...]] = {"attn": ("attn.out_proj", "attn.proj"),
                                               "mlp": ("mlp.c_proj", "mlp.fc2")}

# A key belongs to the adapters when one of its name components is an official adapter module
# (MMA: visual_adapter / text_adapter / shared_adapter; R-Adapter: adapter_attn, adapter_mlp and
# their _cache copies); other keys are backbone weights or buffers.
_ADAPTER_COMPONENT = {"mma": re.compile(r"^(visual|text|shared)_adapter$"),
                      "r-adapter": re.compile(r"^adapter_\w+$")}
_MMA_TOWER = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<tower>visual|text)_adapter\.(?P<layer>\d+)\."
                        r"(?P<part>down\.0|up)\.(?P<param>weight|bias)$")
_MMA_SHARED = re.compile(r"^(?:(?P<prefix>.*)\.)?shared_adapter\.(?P<layer>\d+)\.0\."
                         r"(?P<param>weight|bias)$")
_R_ADAPTER = re.compile(r"^(?P<block>.+)\.adapter_(?P<site>attn|mlp)(?P<cache>_cache)?\."
                        r"(?P<param>f\.weight|d\.weight|u\.weight|s)$")


@dataclass
class OfficialLoadResult:
    """loaded: {official key: pyadapt name}; ignored: keys outside the adapters;
    ema_loaded / ema_skipped: official EMA caches loaded into AdapterEMA shadows, or skipped
    because the model has no AdapterEMA (or ema=False)."""
    loaded: Dict[str, str]
    ignored: List[str]
    ema_loaded: Dict[str, str] = field(default_factory=dict)
    ema_skipped: List[str] = field(default_factory=list)


@dataclass
class _Copy:
    key: str                          # official key(s), for messages
    target_name: str                  # pyadapt name
    target: Tensor
    value: Callable[[], Tensor]       # the value in the target's layout
    shape: Tuple[int, ...]            # shape of value()
    ema: bool = False
    sources: Tuple[str, ...] = ()     # every official key the value is made from

    def __post_init__(self):
        self.sources = self.sources or (self.key,)


def load_official(model: nn.Module, state_dict: Mapping[str, Tensor], method: str = "mma", *,
                  strict: bool = True, ema: bool = True,
                  sites: Optional[Dict[str, Sequence[str]]] = None) -> OfficialLoadResult:
    """Copy the adapter tensors of an official MMA or R-Adapter checkpoint into the pyadapt
    adapters of `model` (see the module docstring for the name mapping).

    method: "mma" (the model must hold one pyadapt.MultiModalAdapter) or "r-adapter" (the
    model's RAdapters, e.g. from `pyadapt.inject(model, r"(attn\\.out_proj|mlp\\.c_proj)$",
    "r-adapter")`). strict: unknown and missing names raise (else they are skipped). ema: load
    R-Adapter's `*_cache` EMA copies into AdapterEMA shadows when the model has them. sites
    (R-Adapter): {"attn": [...], "mlp": [...]} relative module paths to try for each official
    site instead of R_ADAPTER_SITES."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    marker = _ADAPTER_COMPONENT[method]
    adapter_keys, ignored = [], []
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"state_dict: expected string keys, got {k!r}")
        if not any(marker.match(part) for part in k.split(".")):
            ignored.append(k)
            continue
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            raise TypeError(f"state_dict[{k!r}]: expected a floating-point tensor, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        adapter_keys.append(k)
    ignored.sort()
    if method == "mma":
        copies, unknown, expected = _plan_mma(model, state_dict, adapter_keys)
        skipped_ema: List[str] = []
    else:
        copies, unknown, expected, skipped_ema = _plan_r_adapter(model, state_dict, adapter_keys,
                                                                 sites or R_ADAPTER_SITES, ema)
    got = {c.target_name for c in copies if not c.ema}
    missing = sorted(set(expected) - got)
    if strict and (unknown or missing):
        raise ValueError(f"state_dict ({method}): unknown names {sorted(unknown)}; missing "
                         f"pyadapt tensors {missing}")
    for c in copies:
        if tuple(c.shape) != tuple(c.target.shape):
            raise ValueError(f"state_dict[{c.key!r}]: shape {tuple(c.shape)} does not fit "
                             f"{c.target_name} of shape {tuple(c.target.shape)}")
    # Everything checked: now compute and copy.
    values = [c.value() for c in copies]
    with torch.no_grad():
        for c, v in zip(copies, values):
            c.target.copy_(v.reshape(c.target.shape))
    return OfficialLoadResult({k: c.target_name for c in copies if not c.ema for k in c.sources},
                              ignored,
                              {k: c.target_name for c in copies if c.ema for k in c.sources},
                              skipped_ema)


def _find_mma(model: nn.Module) -> Tuple[str, MultiModalAdapter]:
    """The model's one MultiModalAdapter: a submodule, or a plain attribute of the model (the
    open_clip add_mma keeps it as `model._pyadapt_mma`, its adapters living in the blocks)."""
    found = {id(m): (n, m) for n, m in model.named_modules() if isinstance(m, MultiModalAdapter)}
    for n, v in vars(model).items():
        if isinstance(v, MultiModalAdapter) and id(v) not in found:
            found[id(v)] = (n, v)
    if len(found) != 1:
        raise ValueError(f"model: method 'mma' needs exactly one pyadapt.MultiModalAdapter in "
                         f"the model, found {len(found)} ({[n for n, _ in found.values()]})")
    return next(iter(found.values()))


def _plan_mma(model: nn.Module, sd: Mapping[str, Tensor], keys: List[str]):
    prefix, mma = _find_mma(model)
    pre = f"{prefix}." if prefix else ""
    # Report each tensor under its name in the model (where the adapters live), else under
    # the MultiModalAdapter's own.
    in_model = {id(t): n for n, t in _named_adapter_tensors(_adapter_modules(model)).items()}

    def model_name(name: str, t: Tensor) -> str:
        return in_model.get(id(t), pre + name)

    expected = []
    for i in mma.layers:
        names = [f"{tower}.{i}.{part}.{param}" for tower in ("vision_adapters", "text_adapters")
                 for part in ("down", "up") for param in ("weight", "bias")]
        names += [f"shared.{i}.weight", f"shared.{i}.bias"]
        expected += [model_name(n, _get_tensor(mma, n)) for n in names]
    copies, unknown = [], []
    for k in keys:
        m = _MMA_TOWER.match(k)
        if m:
            tower = "vision_adapters" if m["tower"] == "visual" else "text_adapters"
            part = "down" if m["part"] == "down.0" else "up"
            name = f"{tower}.{int(m['layer'])}.{part}.{m['param']}"
        else:
            m = _MMA_SHARED.match(k)
            if not m:
                unknown.append(k)
                continue
            name = f"shared.{int(m['layer'])}.{m['param']}"
        target = _get_tensor(mma, name)
        if target is None:
            unknown.append(k)
            continue
        v = sd[k]
        copies.append(_Copy(k, model_name(name, target), target, lambda v=v: v, tuple(v.shape)))
    return copies, unknown, expected


def _get_tensor(root: nn.Module, name: str) -> Optional[Tensor]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(module_name) if module_name else root
    except AttributeError:
        return None
    t = getattr(module, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _find_site(radapters: Dict[str, RAdapter], block: str, candidates: Sequence[str]
               ) -> Optional[Tuple[str, str]]:
    """(dropped prefix, RAdapter name) for an official block path: drop the fewest leading
    components the model lacks."""
    parts = block.split(".")
    for start in range(len(parts)):
        stem = ".".join(parts[start:])
        for site in candidates:
            if f"{stem}.{site}" in radapters:
                return ".".join(parts[:start]), f"{stem}.{site}"
    return None


def _plan_r_adapter(model: nn.Module, sd: Mapping[str, Tensor], keys: List[str],
                    sites: Dict[str, Sequence[str]], ema: bool):
    radapters = {n: m for n, m in model.named_modules() if isinstance(m, RAdapter)}
    if not radapters:
        raise ValueError("model: method 'r-adapter' needs pyadapt.RAdapter modules in the model "
                         "(pyadapt.inject(model, ..., 'r-adapter') or the open_clip "
                         "add_r_adapter)")
    expected = []
    for n, m in radapters.items():
        expected += [f"{n}.{t}" for t, _ in m.adapter_tensors()]
    # Group the official tensors per (pyadapt site, cache or live).
    groups: Dict[Tuple[str, bool], Dict[str, str]] = {}
    unknown, skipped_ema = [], []
    resolved = []
    for k in keys:
        m = _R_ADAPTER.match(k)
        found = _find_site(radapters, m["block"], sites[m["site"]]) if m else None
        if found is None:
            unknown.append(k)
        else:
            resolved.append((k, m, *found))
    # A wrapper prefix ("module.", "image_encoder.model.") is the same for every key; dropping
    # different prefixes would let "visual.transformer..." land in a model's "transformer...".
    dropped = {}
    for k, _, prefix, _ in resolved:
        dropped.setdefault(prefix, []).append(k)
    if len(dropped) > 1:
        raise ValueError(f"state_dict: its adapter names fit the model only after dropping "
                         f"different leading prefixes {sorted(dropped)} (e.g. "
                         f"{[v[0] for _, v in sorted(dropped.items())]}); the tensors do not "
                         f"correspond to the model's RAdapters one to one")
    for k, m, _, site in resolved:
        is_cache = m["cache"] is not None
        if is_cache and (not ema or radapters[site]._ema_shadow is None):
            skipped_ema.append(k)
            continue
        groups.setdefault((site, is_cache), {})[m["param"]] = k
    copies = []
    for (site, is_cache), params in sorted(groups.items()):
        mod = radapters[site]

        def dest(tname: str) -> Tensor:
            live = getattr(mod, tname)
            return mod._ema_shadow[tname] if is_cache else live

        if "s" in params:
            k = params["s"]
            if not isinstance(mod.scale, nn.Parameter):
                raise ValueError(f"state_dict[{k!r}]: {site} has a fixed scale "
                                 f"({mod.scale}); build it with learn_scale=True to load the "
                                 f"official learned scale")
            v = sd[k]
            shape = () if v.numel() == 1 else tuple(v.shape)
            copies.append(_Copy(k, f"{site}.scale", dest("scale"), lambda v=v: v.reshape(shape),
                                shape, is_cache))
        if "f.weight" in params:
            k = params["f.weight"]
            if mod.rank is not None:
                raise ValueError(f"state_dict[{k!r}]: a full d x d adapter cannot be loaded into "
                                 f"{site}, a rank-{mod.rank} RAdapter; build it with rank=None")
            v = sd[k]
            copies.append(_Copy(k, f"{site}.full_weight", dest("full_weight"), lambda v=v: v,
                                tuple(v.shape), is_cache))
        if "d.weight" in params or "u.weight" in params:
            if not ("d.weight" in params and "u.weight" in params):
                lone = params.get("d.weight") or params.get("u.weight")
                unknown.append(lone)  # half a factor pair maps to nothing
                continue
            kd, ku = params["d.weight"], params["u.weight"]
            d, u = sd[kd], sd[ku]
            if mod.rank is None:
                if d.dim() != 2 or u.dim() != 2 or u.shape[1] != d.shape[0]:
                    raise ValueError(f"state_dict[{ku!r}] {tuple(u.shape)} and [{kd!r}] "
                                     f"{tuple(d.shape)}: not a factor pair u (d x r), d (r x d)")
                # W_f = W_u W_d, formed in float64 and rounded once.
                copies.append(_Copy(f"{ku} @ {kd}", f"{site}.full_weight", dest("full_weight"),
                                    lambda u=u, d=d: u.double() @ d.double(),
                                    (u.shape[0], d.shape[1]), is_cache, (ku, kd)))
            else:
                copies.append(_Copy(kd, f"{site}.down_weight", dest("down_weight"),
                                    lambda v=d: v, tuple(d.shape), is_cache))
                copies.append(_Copy(ku, f"{site}.up_weight", dest("up_weight"),
                                    lambda v=u: v, tuple(u.shape), is_cache))
    return copies, unknown, expected, sorted(skipped_ema)
