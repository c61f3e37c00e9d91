"""Optimizer registry: names to factories, with weight decay as L2 or decoupled.

Variants are data (an entry with defaults), not subclasses: ``adamw`` is ``torch.optim.Adam`` whose weight decay is
decoupled, ``amsgrad`` is Adam with ``amsgrad=True``. Every name combines with both weight-decay modes, so each cell
of the 2018 study's comparison (Adam+L2, Adam+WD, AMSGrad+L2, AMSGrad+WD, SGD+L2, SGD+WD) exists.

* ``wd_mode="l2"``: the decay goes into the optimizer's own ``weight_decay`` (added to the gradient, then mixed into
  the moving averages: what torch's ``Adam(weight_decay=...)`` and ``SGD(weight_decay=...)`` do).
* ``wd_mode="decoupled"``: the optimizer gets ``weight_decay=0``, each parameter group records ``decoupled_wd``, and
  the optimizer carries a :class:`~lightning_adamw.decay.DecoupledWeightDecay`, which applies
  ``w <- w - lr_t * wd * w`` inside every ``optimizer.step()``, after backward and before the update: the optimizer
  decays by itself, in a Lightning run, Lightning's ``Tuner.lr_find`` or a plain loop.
  :class:`~lightning_adamw.OneCycleWD` schedules ``lr_t`` (and may take the decay over for its conventions).

Example::

    from lightning_adamw import OptimizerConfig

    def configure_optimizers(self):
        # Adam + decoupled weight decay 0.1, the CIFAR-10 recipe of the 2018 study
        return OptimizerConfig("adamw", lr=3e-3, betas=(0.95, 0.99), weight_decay=0.1).build(self)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_adamw.backbones import backbone_layer_groups
from lightning_adamw.decay import DECOUPLED_WD_KEY, DecoupledWeightDecay
from lightning_adamw.muon import MuonAdamW, muon_split

WdMode = Literal["l2", "decoupled"]

#: Parameter-group key holding the index of the layer group (for discriminative learning rates).
LAYER_GROUP_KEY = "layer_group"
#: ``OptimizerConfig``'s lr when none is given (torch.optim.Adam's default).
DEFAULT_LR = 1e-3


class OptionalFactory:
    """An optimizer class from a package that is an optional extra: imported on first use, with a clear error.

    Args:
        module: the module that holds the class (``pytorch_optimizer``).
        name: the class name (``Lion``).
        package: the PyPI package to install (``pytorch-optimizer``).
        extra: this project's extra that installs it (``optim``).
    """

    def __init__(self, module: str, name: str, package: str, extra: str) -> None:
        self.module, self.name, self.package, self.extra = module, name, package, extra

    def resolve(self) -> Callable[..., Optimizer]:
        """The optimizer class; ``ImportError`` naming the extra when the package is missing."""
        try:
            return getattr(importlib.import_module(self.module), self.name)
        except ImportError:
            raise ImportError(
                f"{self.module}.{self.name} needs the package {self.package!r}: pip install "
                f"'lightning-adamw[{self.extra}]' (or pip install {self.package})."
            ) from None

    def __call__(self, *args: Any, **kwargs: Any) -> Optimizer:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class OptimizerEntry:
    """One registry entry.

    Args:
        name: the name configs use.
        factory: called as ``factory(param_groups, lr=..., weight_decay=..., **defaults, **overrides)``.
        defaults: keyword arguments this entry always passes (``{"amsgrad": True}``), overridable by the user.
        default_wd_mode: the weight-decay mode used when a config does not name one.
        native_weight_decay: what the factory's own ``weight_decay`` argument does: ``"l2"`` (torch's Adam, SGD,
            RMSprop), ``"decoupled"`` (optimizers that decay the weights themselves) or ``"none"`` (no such argument).
        fixed_wd_mode: the name implies a mode (``adamw``, ``sgdw``) and the other mode is an error.
        owns_decoupled_decay: in decoupled mode the optimizer applies the decay itself (its ``weight_decay`` gets the
            value) instead of :class:`~lightning_adamw.decay.DecoupledWeightDecay`; for optimizers whose decay is not
            ``w <- w - lr * wd * w`` on the stored weights (schedule-free methods decay their interpolated point).
        split: for optimizers that run different methods on different parameters (``muon``): called as
            ``split(modules, **split_options)`` with the module or its layer groups, it returns a function
            ``(name, parameter) -> extra group keys``; parameters with different keys get separate groups.
        split_options: the keyword arguments (from the config) that go to ``split`` instead of the optimizer.
        description: one line for ``available_optimizers`` listings.
    """

    name: str
    factory: Callable[..., Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_wd_mode: WdMode = "l2"
    native_weight_decay: Literal["l2", "decoupled", "none"] = "l2"
    fixed_wd_mode: bool = False
    owns_decoupled_decay: bool = False
    split: Callable[..., Callable[[str, torch.Tensor], Mapping[str, Any]]] | None = None
    split_options: tuple[str, ...] = ()
    description: str = ""

    def accepted_kwargs(self) -> set[str] | None:
        """Keyword arguments the factory accepts, or ``None`` when it takes ``**kwargs``."""
        factory = self.factory.resolve() if isinstance(self.factory, OptionalFactory) else self.factory
        params = inspect.signature(factory).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params}


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(
    name: str,
    factory: Callable[..., Optimizer],
    *,
    defaults: Mapping[str, Any] | None = None,
    default_wd_mode: WdMode = "l2",
    native_weight_decay: Literal["l2", "decoupled", "none"] = "l2",
    fixed_wd_mode: bool = False,
    owns_decoupled_decay: bool = False,
    split: Callable[..., Callable[[str, torch.Tensor], Mapping[str, Any]]] | None = None,
    split_options: Sequence[str] = (),
    description: str = "",
    overwrite: bool = False,
) -> OptimizerEntry:
    """Add an optimizer under ``name`` so configs can use it.

    Example::

        register_optimizer("nadam", torch.optim.NAdam, description="Adam with Nesterov")

    Raises:
        ValueError: ``name`` is taken (pass ``overwrite=True`` to replace it) or is not a lowercase identifier.
    """
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"Optimizer name {name!r} must be a lowercase identifier such as 'my_adam'.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Optimizer {name!r} is already registered; pass overwrite=True to replace it.")
    if fixed_wd_mode and default_wd_mode == "l2" and native_weight_decay != "l2":
        raise ValueError(f"Optimizer {name!r}: a fixed 'l2' mode needs an optimizer whose weight_decay is L2.")
    entry = OptimizerEntry(
        name=name,
        factory=factory,
        defaults=dict(defaults or {}),
        default_wd_mode=default_wd_mode,
        native_weight_decay=native_weight_decay,
        fixed_wd_mode=fixed_wd_mode,
        owns_decoupled_decay=owns_decoupled_decay,
        split=split,
        split_options=tuple(split_options),
        description=description,
    )
    _REGISTRY[name] = entry
    return entry


def available_optimizers() -> list[str]:
    """Sorted names of every registered optimizer."""
    return sorted(_REGISTRY)


def get_optimizer_entry(name: str) -> OptimizerEntry:
    """The entry for ``name`` (any case: ``"AdamW"`` is ``adamw``); an unknown name raises with the valid names and
    the closest match."""
    try:
        return _REGISTRY[str(name).lower()]
    except KeyError:
        close = difflib.get_close_matches(str(name).lower(), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown optimizer {name!r}.{hint} Valid names: {', '.join(available_optimizers())}. "
            "Add your own with lightning_adamw.register_optimizer(name, factory)."
        ) from None


def resolve_wd_mode(entry: OptimizerEntry, wd_mode: WdMode | None) -> WdMode:
    """The weight-decay mode for ``entry``: the requested one, or the entry's default; conflicts raise."""
    if wd_mode is None:
        return entry.default_wd_mode
    if wd_mode not in ("l2", "decoupled"):
        raise ValueError(f"wd_mode must be 'l2' or 'decoupled', got {wd_mode!r}.")
    if entry.fixed_wd_mode and wd_mode != entry.default_wd_mode:
        base = next((n for n, e in _REGISTRY.items() if e.factory is entry.factory and not e.fixed_wd_mode), None)
        fix = (f"use {base!r} with wd_mode={wd_mode!r}" if base
               else f"drop wd_mode or use wd_mode={entry.default_wd_mode!r}")
        raise ValueError(
            f"Optimizer {entry.name!r} means weight decay mode {entry.default_wd_mode!r}, but wd_mode={wd_mode!r} "
            f"was requested: {fix}."
        )
    if wd_mode == "l2" and entry.native_weight_decay != "l2":
        raise ValueError(
            f"Optimizer {entry.name!r} has no L2 weight decay (its own weight_decay is "
            f"{entry.native_weight_decay!r}); use wd_mode='decoupled'."
        )
    return wd_mode


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    # timm's rule: biases and every 1-d tensor (BatchNorm/LayerNorm/GroupNorm weights and biases)
    return param.ndim <= 1 or name.endswith(".bias") or name == "bias"


def _layer_group_modules(params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor]) -> list[nn.Module] | None:
    """The layer-group modules ``params`` names (a module is one group), or ``None`` for bare tensors."""
    if isinstance(params, nn.Module):
        return [params]
    items = list(params)
    return items if items and all(isinstance(m, nn.Module) for m in items) else None


def _named_layer_groups(
    params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor],
) -> list[list[tuple[str, torch.Tensor]]]:
    items = params if isinstance(params, nn.Module) else list(params)
    modules = _layer_group_modules(items)
    if modules is not None:
        return [list(m.named_parameters()) for m in modules]
    if all(isinstance(p, torch.Tensor) for p in items):
        return [[(f"param{i}", p) for i, p in enumerate(items)]]
    raise TypeError(
        "Expected a module, a list of modules (layer groups) or an iterable of parameters; got "
        f"{[type(m).__name__ for m in items[:3]]}..."
    )


def param_groups(
    params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor],
    *,
    lr: float | Sequence[float],
    weight_decay: float | Sequence[float] = 0.0,
    wd_mode: WdMode = "l2",
    exclude_bias_and_norm: bool = False,
    split: Callable[[str, torch.Tensor], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups with per-layer-group learning rates and weight decay in the requested mode.

    Args:
        params: a module, a list of modules (layer groups, e.g. body then head) or an iterable of parameters.
        lr: one learning rate, or one per layer group (discriminative learning rates).
        weight_decay: the decay, or one per layer group; where it goes depends on ``wd_mode`` (see the module
            docstring).
        wd_mode: ``"l2"`` or ``"decoupled"``.
        exclude_bias_and_norm: no decay for biases and 1-d parameters (normalisation weights). The 2018 study
            decayed everything, hence the default ``False``.
        split: ``(name, parameter) -> extra group keys`` (e.g. ``{"use_muon": True}``); parameters with different keys
            go to separate groups, which carry the keys.

    Each group carries ``layer_group`` (its index) and ``decoupled_wd``. A parameter shared between
    layer groups (tied weights) belongs to the first group that holds it.
    """
    groups = _named_layer_groups(params)
    lrs = _per_group(lr, len(groups), "learning rates")
    wds = _per_group(weight_decay, len(groups), "weight decays")
    if min(wds) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    seen: set[int] = set()
    out: list[dict[str, Any]] = []
    for index, (named, group_lr, group_wd) in enumerate(zip(groups, lrs, wds)):
        for (no_decay, extra), plist in _buckets(named, seen, exclude_bias_and_norm, split):
            wd = 0.0 if no_decay else group_wd
            out.append(
                {
                    "params": plist,
                    "lr": group_lr,
                    "weight_decay": wd if wd_mode == "l2" else 0.0,
                    DECOUPLED_WD_KEY: wd if wd_mode == "decoupled" else 0.0,
                    LAYER_GROUP_KEY: index,
                    **dict(extra),
                }
            )
    if not out:
        raise ValueError("No parameters to optimize: the module or layer groups are empty.")
    return out


def _per_group(value: float | Sequence[float], n_groups: int, what: str) -> list[float]:
    """``value`` for each of ``n_groups`` layer groups: one value for all of them, or one per group."""
    values = [float(value)] * n_groups if isinstance(value, (int, float)) else [float(x) for x in value]
    if len(values) != n_groups:
        raise ValueError(f"Got {len(values)} {what} for {n_groups} layer groups; give one, or one per group.")
    return values


_Bucket = tuple[bool, tuple[tuple[str, Any], ...]]  # (no decay, the split's extra group keys)


def _buckets(
    named: list[tuple[str, torch.Tensor]],
    seen: set[int],
    exclude_bias_and_norm: bool,
    split: Callable[[str, torch.Tensor], Mapping[str, Any]] | None,
) -> list[tuple[_Bucket, list[torch.Tensor]]]:
    """One layer group's parameters by (no decay, split keys), decayed ones first; skips (and records) ``seen``."""
    buckets: dict[_Bucket, list[torch.Tensor]] = {}
    for name, p in named:
        if id(p) in seen:
            continue
        seen.add(id(p))
        extra = tuple(sorted(split(name, p).items())) if split is not None else ()
        no_decay = exclude_bias_and_norm and _is_no_decay(name, p)
        buckets.setdefault((no_decay, extra), []).append(p)
    return sorted(buckets.items(), key=lambda item: item[0][0])


def even_mults(lo: float, hi: float, n: int) -> list[float]:
    """``n`` values from ``lo`` to ``hi`` in geometric steps (fastai's ``even_mults``, what ``slice(lo, hi)`` means)."""
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)] if n > 1 else [hi]


def module_layer_groups(module: nn.Module) -> list[nn.Module] | None:
    """``module.layer_groups()`` if it has the method, else the default split of the torchvision backbone it holds
    (:func:`~lightning_adamw.backbone_layer_groups`), else ``None``."""
    getter = getattr(module, "layer_groups", None)
    if callable(getter):
        return list(getter())
    try:
        return backbone_layer_groups(module)
    except ValueError:
        return None


def build_optimizer(
    params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor],
    name: str = "adam",
    *,
    lr: float | Sequence[float] = 1e-3,
    weight_decay: float | Sequence[float] = 0.0,
    wd_mode: WdMode | None = None,
    exclude_bias_and_norm: bool = False,
    **kwargs: Any,
) -> Optimizer:
    """Build the registered optimizer ``name`` over ``params``.

    Extra keyword arguments (``betas``, ``eps``, ``momentum``, ...) go to the optimizer; one it does not take raises
    with the list of those it does.
    """
    entry = get_optimizer_entry(name)
    return _build(entry, resolve_wd_mode(entry, wd_mode), params, lr=lr, weight_decay=weight_decay,
                  exclude_bias_and_norm=exclude_bias_and_norm, **kwargs)


def _split(
    entry: OptimizerEntry,
    params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor],
    split_kwargs: dict[str, Any],
) -> Callable[[str, torch.Tensor], Mapping[str, Any]] | None:
    """The entry's ``(name, parameter) -> group keys`` over ``params`` (``None``: the entry does not split)."""
    if entry.split is None:
        return None
    modules = _layer_group_modules(params)
    if modules is not None:
        return entry.split(modules, **split_kwargs)
    if split_kwargs:
        raise ValueError(
            f"Optimizer {entry.name!r}: {sorted(split_kwargs)} name parameters, so build it over a module or a list "
            "of layer-group modules rather than bare tensors."
        )
    return None


def _options(entry: OptimizerEntry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments: the entry's defaults, then the user's; unknown ones raise."""
    options = {**entry.defaults, **kwargs}
    accepted = entry.accepted_kwargs()
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            valid = sorted((accepted - {"self", "params", "lr", "weight_decay"}) | set(entry.split_options))
            raise ValueError(f"Optimizer {entry.name!r} does not take {unknown}; it takes {valid}.")
    if entry.native_weight_decay != "none":
        options["weight_decay"] = 0.0  # set per group
    return options


def _build(
    entry: OptimizerEntry,
    mode: WdMode,
    params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor],
    *,
    lr: float | Sequence[float],
    weight_decay: float | Sequence[float],
    exclude_bias_and_norm: bool,
    **kwargs: Any,
) -> Optimizer:
    """``build_optimizer`` for a resolved entry and mode."""
    split_kwargs = {k: kwargs.pop(k) for k in entry.split_options if k in kwargs}
    if entry.split is not None and not isinstance(params, nn.Module):
        params = list(params)  # read twice: split, then groups
    groups = param_groups(params, lr=lr, weight_decay=weight_decay, wd_mode=mode,
                          exclude_bias_and_norm=exclude_bias_and_norm, split=_split(entry, params, split_kwargs))
    owned_by_optimizer = mode == "decoupled" and entry.owns_decoupled_decay
    if owned_by_optimizer:  # the optimizer's own weight_decay is the decoupled decay: hand it over
        for group in groups:
            group["weight_decay"], group[DECOUPLED_WD_KEY] = group[DECOUPLED_WD_KEY], 0.0
    optimizer = entry.factory(groups, lr=groups[0]["lr"], **_options(entry, kwargs))
    if mode == "decoupled" and any(g[DECOUPLED_WD_KEY] > 0 for g in groups) and not owned_by_optimizer:
        DecoupledWeightDecay.attach(optimizer)
    return optimizer


@dataclass
class OptimizerConfig:
    """An optimizer chosen by name, as it appears in a config file.

    Args:
        name: a registry name, any case (``sgd``, ``sgdw``, ``adam``, ``adamw``, ``amsgrad``, ``rmsprop``, ``muon``;
            ``lion``, ``schedulefree_adamw`` with the ``optim`` extra; or one you added).
        lr: the (maximum) learning rate, or one per layer group for discriminative learning rates; default 1e-3.
        lr_range: ``(lo, hi)``, fastai's ``lr=slice(lo, hi)``: layer group ``i`` of ``n`` (body first) gets
            ``lo * (hi / lo) ** (i / (n - 1))``, a geometric spread from ``lo`` to ``hi`` (fastai's ``even_mults``).
            Replaces ``lr``.
        layer_decay: timm's ``layer_decay``: layer group ``i`` of ``n`` gets ``lr * layer_decay ** (n - 1 - i)``, so
            the head keeps ``lr`` and each group below it is ``layer_decay`` times slower (timm's
            ``param_groups_layer_decay``; ViT fine-tuning uses 0.65-0.75). Needs a single ``lr``.
        weight_decay: weight decay (``wd`` in the study), or one per layer group; see ``wd_mode``.
        wd_mode: ``"l2"`` or ``"decoupled"``; ``None`` takes the name's default (``adamw``/``sgdw``: decoupled).
        betas: Adam's ``(beta1, beta2)``; the 2018 recipes use beta2 = 0.99.
        momentum: SGD/RMSprop/Muon momentum.
        eps: the optimizer's epsilon.
        exclude_bias_and_norm: no decay on biases and normalisation weights.
        kwargs: any other optimizer argument (``nesterov``, ``alpha``, ...), and for ``muon`` the split overrides
            ``muon_params`` / ``adamw_params`` (see :func:`lightning_adamw.muon.muon_split`). ``None`` (or ``{}``):
            none; a comparison variant writes ``kwargs: null`` to drop the base config's (``nesterov`` for Adam).

    ``lr_range`` and ``layer_decay`` need the layer groups: build over a list of modules (body first, head last) or
    a module with a ``layer_groups()`` method returning them.

    Example::

        OptimizerConfig("adam", lr=3e-3, betas=(0.95, 0.99), weight_decay=0.1, wd_mode="decoupled").build(model)
        OptimizerConfig("adamw", lr_range=(3e-3 / 9, 3e-3)).build(model)  # 3 groups: 3e-3/9, 3e-3/3, 3e-3
    """

    name: str = "adam"
    lr: float | list[float] | None = None
    lr_range: tuple[float, float] | None = None
    layer_decay: float | None = None
    weight_decay: float | list[float] = 0.0
    wd_mode: WdMode | None = None
    betas: tuple[float, float] | None = None
    momentum: float | None = None
    eps: float | None = None
    exclude_bias_and_norm: bool = False
    kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # plain values whatever built the config (Hydra passes its ListConfig containers)
        self.name = get_optimizer_entry(self.name).name
        self.lr = [float(x) for x in self.lr] if isinstance(self.lr, Sequence) else self.lr
        self.betas = None if self.betas is None else tuple(float(b) for b in self.betas)
        self.lr_range = None if self.lr_range is None else tuple(float(x) for x in self.lr_range)
        entry, _ = self._resolve()
        if isinstance(entry.factory, OptionalFactory):
            try:
                entry.factory.resolve()
            except ImportError as err:
                raise ValueError(f"Optimizer {self.name!r}: {err}") from None
        self._check_lrs()
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}.")

    def _check_lrs(self) -> None:
        """``lr``, ``lr_range`` and ``layer_decay`` each set the groups' lrs: valid values, and one way at a time."""
        lrs = [DEFAULT_LR if self.lr is None else self.lr] if not isinstance(self.lr, Sequence) else list(self.lr)
        if not lrs or any(x <= 0 for x in lrs):
            raise ValueError(f"lr must be positive (one value or one per layer group), got {self.lr}.")
        if self.lr_range is not None:
            if self.lr is not None or self.layer_decay is not None:
                given = "lr" if self.lr is not None else "layer_decay"
                raise ValueError(
                    f"lr_range={list(self.lr_range)} sets every layer group's lr (fastai's slice(lo, hi)), so {given} "
                    f"would be ignored: give lr_range alone, or drop it and give {given}."
                )
            if len(self.lr_range) != 2 or not 0 < self.lr_range[0] <= self.lr_range[1]:
                raise ValueError(f"lr_range must be [lo, hi] with 0 < lo <= hi, got {self.lr_range}.")
        if self.layer_decay is not None:
            if len(lrs) > 1:
                raise ValueError(
                    f"layer_decay={self.layer_decay} derives each group's lr from one lr (the head's), but lr is the "
                    f"list {self.lr}: give a single lr, or drop layer_decay and keep the list."
                )
            if self.layer_decay <= 0:
                raise ValueError(f"layer_decay must be positive (timm uses 0.65-0.9), got {self.layer_decay}.")

    def _resolve(self) -> tuple[OptimizerEntry, WdMode]:
        """The registry entry and weight-decay mode, resolved once per ``(name, wd_mode)``."""
        key = (self.name, self.wd_mode)
        cached = self.__dict__.get("_resolved")
        if cached is None or cached[0] != key:
            entry = get_optimizer_entry(self.name)
            cached = self.__dict__["_resolved"] = (key, entry, resolve_wd_mode(entry, self.wd_mode))
        return cached[1], cached[2]

    @property
    def resolved_wd_mode(self) -> WdMode:
        """The weight-decay mode after applying the name's default."""
        return self._resolve()[1]

    def group_lrs(self, n_groups: int) -> list[float]:
        """The lr of each of ``n_groups`` layer groups, body first."""
        if self.lr_range is not None:
            return even_mults(*self.lr_range, n_groups)
        if isinstance(self.lr, Sequence):
            return [float(x) for x in self.lr]
        lr = DEFAULT_LR if self.lr is None else float(self.lr)
        decay = 1.0 if self.layer_decay is None else self.layer_decay
        return [lr * decay ** (n_groups - 1 - i) for i in range(n_groups)]

    def _layer_groups(self, params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor]) -> list[nn.Module]:
        option = "lr_range" if self.lr_range is not None else "layer_decay"
        groups = module_layer_groups(params) if isinstance(params, nn.Module) else _layer_group_modules(params)
        if groups is None or len(groups) < 2:
            what = (f"{type(params).__name__} has no layer_groups() method and holds no torchvision backbone"
                    if isinstance(params, nn.Module) else "the parameters are not a list of at least two modules")
            raise ValueError(
                f"{option} spreads the lr over layer groups, but {what}. Build over a list of modules, body first "
                "(.build([model.body, model.head])), or give the module a layer_groups() method returning them "
                "(lightning_adamw.backbone_layer_groups(net) splits torchvision ResNets, EfficientNets, ConvNeXts)."
            )
        return groups

    def build(self, params: nn.Module | Sequence[nn.Module] | Iterable[torch.Tensor]) -> Optimizer:
        """The optimizer over a module, a list of layer-group modules, or parameters."""
        extra = {k: v for k, v in (("betas", self.betas), ("momentum", self.momentum), ("eps", self.eps))
                 if v is not None}
        lr: float | list[float] = DEFAULT_LR if self.lr is None else self.lr
        if self.lr_range is not None or self.layer_decay is not None:
            params = self._layer_groups(params)
            lr = self.group_lrs(len(params))
        entry, mode = self._resolve()
        return _build(entry, mode, params, lr=lr, weight_decay=self.weight_decay,
                      exclude_bias_and_norm=self.exclude_bias_and_norm, **extra, **(self.kwargs or {}))


register_optimizer("sgd", torch.optim.SGD, defaults={"momentum": 0.9},
                   description="SGD with momentum 0.9 (L2 weight decay by default)")
register_optimizer("sgdw", torch.optim.SGD, defaults={"momentum": 0.9},
                   default_wd_mode="decoupled", fixed_wd_mode=True, description="SGD with decoupled weight decay")
register_optimizer("adam", torch.optim.Adam, description="Adam (L2 weight decay by default)")
register_optimizer("adamw", torch.optim.Adam, default_wd_mode="decoupled",
                   fixed_wd_mode=True, description="Adam with decoupled weight decay (AdamW)")
register_optimizer("amsgrad", torch.optim.Adam, defaults={"amsgrad": True},
                   description="AMSGrad (Adam with v_max); wd_mode selects L2 or decoupled")
register_optimizer("rmsprop", torch.optim.RMSprop, description="RMSprop")
# Muon (torch.optim.Muon) for hidden matrices and conv kernels, AdamW for embeddings, the output layer, biases and
# norms: one optimizer, split by lightning_adamw.muon.muon_split. Both halves decay as w <- w - lr * wd * w, so
# DecoupledWeightDecay can apply it.
register_optimizer("muon", MuonAdamW, native_weight_decay="decoupled", default_wd_mode="decoupled",
                   split=muon_split, split_options=("muon_params", "adamw_params"),
                   description="Muon for hidden matrices and conv kernels + AdamW for the rest (torch.optim.Muon)")
# Optional extras from pytorch-optimizer (one maintained package with a large catalogue, torch its only heavy need):
# install with pip install 'lightning-adamw[optim]'. Lion's decay is AdamW's (w <- w - lr * wd * w), so
# DecoupledWeightDecay can apply it; schedule-free AdamW decays its interpolated point and keeps its own decay.
register_optimizer("lion", OptionalFactory("pytorch_optimizer", "Lion", "pytorch-optimizer", "optim"),
                   native_weight_decay="decoupled", default_wd_mode="decoupled",
                   description="Lion (sign momentum), from pytorch-optimizer")
register_optimizer("schedulefree_adamw",
                   OptionalFactory("pytorch_optimizer", "ScheduleFreeAdamW", "pytorch-optimizer", "optim"),
                   native_weight_decay="decoupled", default_wd_mode="decoupled", owns_decoupled_decay=True,
                   description="Schedule-free AdamW (no decaying schedule; train/eval weights), from pytorch-optimizer")
