"""``MuonAdamW``: Muon for hidden weight matrices and conv kernels, AdamW for everything else, as one optimizer.

Muon (K. Jordan et al. 2024; ``torch.optim.Muon`` since torch 2.9) orthogonalises the momentum of a weight matrix
with a Newton-Schulz iteration. It is meant for the 2-d weights of hidden layers only: embeddings, the output layer,
biases and normalisation gains want an element-wise method such as AdamW. ``torch.optim.Muon`` itself takes 2-d
tensors only, so a network needs two optimizers and conv kernels cannot use it at all. ``MuonAdamW`` is one torch
optimizer whose parameter groups say which method they use (``use_muon``):

* Muon groups run torch's own Muon update (``torch.optim._muon.muon``, the function ``torch.optim.Muon.step``
  calls), with conv kernels ``(out, in, kh, kw)`` seen as ``(out, in * kh * kw)`` matrices, as Keller Jordan's
  reference implementation does;
* AdamW groups run ``torch.optim.Adam`` with ``decoupled_weight_decay=True`` (``torch.optim.AdamW``), delegated to
  an inner Adam that shares this optimizer's groups and state.

Being a single optimizer, it works wherever one is expected: Lightning's automatic optimisation and checkpoints,
:class:`~lightning_adamw.OneCycleWD` (which schedules each group's lr and its momentum: ``momentum`` in Muon groups,
``betas[0]`` in AdamW groups) and the registry's decoupled weight decay. By default the Muon update is scaled with
``adjust_lr_fn="match_rms_adamw"`` (Moonshot AI, "Muon is Scalable for LLM Training", 2025): its RMS then matches
AdamW's, so both halves share one learning rate and one weight decay, the ones tuned for AdamW.

Which parameter goes where is decided by :func:`muon_split` (the registry's ``muon`` entry uses it); given bare tensors
or groups without ``use_muon``, ``MuonAdamW`` puts tensors with two or more dimensions into Muon.

Example::

    from lightning_adamw import OptimizerConfig

    # in configure_optimizers: Muon + AdamW, lr 3e-3 and decoupled weight decay 0.1 (applied by OneCycleWD)
    return OptimizerConfig("muon", lr=3e-3, weight_decay=0.1, betas=(0.95, 0.99)).build(self)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

#: Parameter-group key: ``True`` for groups updated by Muon, ``False`` for groups updated by AdamW.
USE_MUON_KEY = "use_muon"

try:  # torch >= 2.9; the functional update is what torch.optim.Muon.step runs
    from torch.optim._muon import muon as _muon_update
except ImportError:  # pragma: no cover - depends on the installed torch
    _muon_update = None


def _require_muon() -> None:
    if _muon_update is None:
        raise ImportError(
            f"Muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}. "
            "pip install 'torch>=2.9' or pick another optimizer."
        )


def _is_matrix(param: Tensor) -> bool:
    return param.ndim >= 2


class MuonAdamW(Optimizer):
    """Muon for matrices and conv kernels, AdamW for the rest, in one optimizer (see the module docstring).

    Args:
        params: parameters or parameter groups; a group may say ``use_muon``, otherwise its tensors are split by
            dimension (two or more: Muon). :func:`muon_split` (and the registry's ``muon`` entry) also keeps
            embeddings and the output layer out of Muon.
        lr: learning rate of both halves (with ``match_rms_adamw`` they share one).
        weight_decay: decoupled weight decay of both halves, ``w <- w - lr * wd * w`` (Muon's and AdamW's own).
            With :class:`~lightning_adamw.OneCycleWD` leave it 0 and let the callback decay.
        momentum: Muon's momentum (torch default 0.95).
        nesterov: Nesterov momentum in Muon.
        ns_coefficients: the Newton-Schulz polynomial (torch's defaults).
        ns_steps: Newton-Schulz iterations.
        ns_eps: the Newton-Schulz normalisation's epsilon (torch's Muon ``eps``).
        adjust_lr_fn: Muon's lr scaling by matrix shape: ``"match_rms_adamw"`` (default here: AdamW's lr and decay
            carry over), ``"original"`` (Keller Jordan's ``sqrt(max(1, out/in))``) or ``"spectral_unclamped"``.
        betas: AdamW's ``(beta1, beta2)``.
        eps: AdamW's epsilon.
        amsgrad: AMSGrad in the AdamW half.
        foreach: AdamW's multi-tensor implementation (``None``: torch decides).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        adjust_lr_fn: str | None = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _require_muon()
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"lr, weight_decay and momentum must be >= 0, got {lr}, {weight_decay}, {momentum}.")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw", "spectral_unclamped"):
            raise ValueError(
                f"adjust_lr_fn must be 'match_rms_adamw', 'original' or 'spectral_unclamped', got {adjust_lr_fn!r}."
            )
        self._muon_defaults = {"momentum": momentum, "nesterov": nesterov, "ns_coefficients": tuple(ns_coefficients),
                               "ns_steps": ns_steps, "eps": ns_eps, "adjust_lr_fn": adjust_lr_fn}
        self._adam_defaults = {"betas": tuple(betas), "eps": eps, "amsgrad": amsgrad, "foreach": foreach,
                               "maximize": False, "capturable": False, "differentiable": False, "fused": None,
                               "decoupled_weight_decay": True}
        self._adam: torch.optim.Adam | None = None
        super().__init__(_split_by_dimension(params), {"lr": lr, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; without ``use_muon`` it must be all matrices (Muon) or all vectors (AdamW)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if USE_MUON_KEY not in param_group:
            kinds = {_is_matrix(p) for p in params}
            if len(kinds) > 1:
                raise ValueError(
                    "A parameter group added to MuonAdamW mixes matrices and vectors: give it 'use_muon' "
                    "(True: Muon, False: AdamW) or add the two kinds as separate groups."
                )
            param_group[USE_MUON_KEY] = kinds == {True}
        if param_group[USE_MUON_KEY]:
            scalars = [tuple(p.shape) for p in params if not _is_matrix(p)]
            if scalars:
                raise ValueError(
                    f"Muon updates matrices and conv kernels only, but a Muon group holds tensors of shape "
                    f"{scalars[:3]}: put biases and normalisation weights in an AdamW group (use_muon=False)."
                )
        defaults = self._muon_defaults if param_group[USE_MUON_KEY] else self._adam_defaults
        for key, value in defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_muon_defaults": self._muon_defaults, "_adam_defaults": self._adam_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_adam", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step on the Muon groups and one AdamW step on the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        adam_groups = [g for g in self.param_groups if not g[USE_MUON_KEY]]
        if adam_groups:
            self._adam_step(adam_groups)
        for group in self.param_groups:
            if group[USE_MUON_KEY]:
                self._muon_step(group)
        return loss

    def _adam_step(self, groups: list[dict[str, Any]]) -> None:
        # torch's Adam on our own group dicts and state (load_state_dict replaces both, so rebind every step)
        if self._adam is None:
            self._adam = torch.optim.Adam(groups, **self._adam_defaults)
        self._adam.param_groups = groups
        self._adam.state = self.state
        self._adam.step()

    def _muon_step(self, group: dict[str, Any]) -> None:
        params, grads, buffers, copies = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients; give this parameter to AdamW.")
            if p.is_contiguous():
                matrix = p.view(p.shape[0], -1)
            else:
                matrix = p.reshape(p.shape[0], -1)
                copies.append((p, matrix))
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(matrix)
            params.append(matrix)
            grads.append(p.grad.reshape(p.shape[0], -1))
            buffers.append(state["momentum_buffer"])
        if not params:
            return
        _muon_update(
            params, grads, buffers,
            lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
            nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"],
            eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False,
        )
        for p, matrix in copies:  # tensors that could not be viewed as matrices (e.g. channels_last kernels)
            p.copy_(matrix.view_as(p))


def _split_by_dimension(params: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError("MuonAdamW got an empty parameter list.")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out: list[dict[str, Any]] = []
    for group in groups:
        if USE_MUON_KEY in group:
            out.append(group)
            continue
        tensors = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        for use_muon in (True, False):
            chosen = [p for p in tensors if _is_matrix(p) == use_muon]
            if chosen:
                out.append({**group, "params": chosen, USE_MUON_KEY: use_muon})
    return out


def _output_layer(modules: Sequence[nn.Module]) -> nn.Module | None:
    linears = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    vocabularies = {m.num_embeddings for module in modules for m in module.modules()
                    if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    if vocabularies:  # a decoder over a vocabulary; none when it is tied to the embedding (F.linear on its weight)
        linears = [m for m in linears if m.out_features in vocabularies]
    return linears[-1] if linears else None


def muon_split(
    modules: Sequence[nn.Module],
    muon_params: Sequence[str] = (),
    adamw_params: Sequence[str] = (),
) -> Callable[[str, Tensor], dict[str, Any]]:
    """Which parameters Muon updates; the rest go to AdamW.

    The automatic rule (Muon's own advice: Muon for the hidden layers' weights only):

    * Muon: every parameter with two or more dimensions (``Linear`` weights, conv kernels, RNN weight matrices),
    * AdamW: parameters with fewer dimensions (biases, BatchNorm/LayerNorm weights), embeddings (``nn.Embedding``,
      ``nn.EmbeddingBag``, and so a decoder tied to one) and the output layer: the last ``nn.Linear`` in the modules'
      registration order (a classifier's head) or, in a network with embeddings, the last ``nn.Linear`` whose
      ``out_features`` is a vocabulary size (an untied decoder or ``lm_head``; a tied one is the embedding already).
      A head that is not an ``nn.Linear`` (a 1x1 convolution) is not detected: name it in ``adamw_params``.

    Override it with name patterns (``fnmatch``, against the names that ``module.named_parameters()`` gives for each
    layer-group module): ``adamw_params`` forces matches into AdamW, ``muon_params`` into Muon (matrices only).

    Args:
        modules: the module, or its layer groups, that the optimizer is built over.
        muon_params: patterns of parameters to update with Muon whatever the rule says (e.g. ``["head.0.weight"]``).
        adamw_params: patterns of parameters to update with AdamW (e.g. ``["stem.*"]``).

    Returns:
        ``(name, parameter) -> {"use_muon": bool}``, the extra group keys the registry adds.

    Raises:
        ValueError: a pattern matches no parameter, matches one in both lists, or forces a vector into Muon.
    """
    named = [(name, p) for module in modules for name, p in module.named_parameters()]
    adamw_ids = {id(p) for module in modules for m in module.modules()
                 if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters(recurse=False)}
    head = _output_layer(modules)
    if head is not None:  # parameters(), not .weight: a parametrized (weight-dropped) head keeps `original`
        adamw_ids.update(id(p) for p in head.parameters())
    for patterns, what in ((muon_params, "muon_params"), (adamw_params, "adamw_params")):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                raise ValueError(
                    f"{what} pattern {pattern!r} matches no parameter; names look like "
                    f"{[n for n, _ in named[:4]]} (fnmatch patterns over named_parameters())."
                )
    use_muon: dict[int, bool] = {}
    for name, p in named:
        forced_muon = any(fnmatch.fnmatchcase(name, pat) for pat in muon_params)
        forced_adamw = any(fnmatch.fnmatchcase(name, pat) for pat in adamw_params)
        if forced_muon and forced_adamw:
            raise ValueError(f"Parameter {name!r} matches both muon_params and adamw_params; keep it in one.")
        if forced_muon and not _is_matrix(p):
            raise ValueError(
                f"muon_params names {name!r} of shape {tuple(p.shape)}, but Muon updates matrices and conv kernels "
                "only; drop it from muon_params."
            )
        if forced_muon or forced_adamw:
            use_muon.setdefault(id(p), forced_muon)
        else:
            use_muon.setdefault(id(p), _is_matrix(p) and id(p) not in adamw_ids)
    return lambda name, p: {USE_MUON_KEY: use_muon.get(id(p), _is_matrix(p))}
