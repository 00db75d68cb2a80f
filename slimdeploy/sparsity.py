"""Sparsifiers: how a penalty on the BatchNorm scaling factors γ enters training.

- ``subgradient`` (network slimming, Liu et al. 2017; nonconvex variants, Bui et al. 2021): after
  backward and before the optimizer step, add ∂p_λ(γ) to the γ gradients.
- ``proximal`` (proximal NS, Bui et al. 2023): an auxiliary ξ per regularised BN. After each optimizer
  step, with α = 1/lr and coupling β:
      γ ← (α·γ + β·ξ)/(α + β);   ξ ← prox_{p_λ/(α+β)}((α·ξ + β·γ)/(α + β)).
  ξ reaches exact zeros, which name the channels to remove without a threshold.
- ``prox_sgd``: proximal gradient on γ itself, γ ← prox_{lr·p_λ}(γ) after each step.

All regularised γ are handled as one flat vector per step (one penalty call, foreach adds/copies), so
the cost does not grow with the number of BN layers. With ``channels`` only the listed channels of each
BN are penalised (those a pruning plan made before training removes); the other channels train as without
a penalty. Proximal NS then drives exactly the listed channels to 0 and, once their ξ is 0, holds their γ
and shift β at 0, so the rest of the network adapts to their removal and pruning by that plan loses
nothing and needs no compensation.
"""

from __future__ import annotations

import fnmatch
import inspect

import torch
from torch import nn

from slimdeploy import penalties
from slimdeploy.bn import BN_TYPES, affine_bns  # noqa: F401  (BN_TYPES re-exported)
from slimdeploy.penalties import Penalty
from slimdeploy.registry import Registry
from slimdeploy.results import ProximalSummary

SPARSIFIERS: Registry[type["Sparsifier"]] = Registry("sparsity method")


def select_bns(model: nn.Module, include: list[str] = (), exclude: list[str] = ()) -> dict[str, nn.Module]:
    """BN layers with an affine γ whose names match ``include`` (all if empty) and not ``exclude``."""
    chosen = {}
    for name, module in affine_bns(model).items():
        if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        chosen[name] = module
    return chosen


@SPARSIFIERS.register("none", description="no penalty: plain training")
class Sparsifier:
    """No penalty. Subclasses act around the optimizer step; all keep their state in ``state_dict``.

    :meth:`attach` hooks an optimizer, so a training loop needs no change: the pre-step hook runs after
    backward (and after a GradScaler unscaled the gradients), the post-step hook after the update with
    the learning rate of the γ's param group. A step a GradScaler skips never reaches either hook.
    """

    method = "none"
    uses_penalty = False

    def __init__(self, model: nn.Module, penalty: Penalty | None = None, include=(), exclude=(),
                 channels: dict[str, list[int]] | None = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # BN names as in the plain model
        self.penalty = penalty
        self.bns = select_bns(model, include, exclude)
        if channels is not None:
            self.bns = {name: bn for name, bn in self.bns.items() if len(channels.get(name, ())) > 0}
        self.gammas = [bn.weight for bn in self.bns.values()]
        self.sizes = [g.numel() for g in self.gammas]
        self.mask = None if channels is None else _channel_mask(self.bns, channels, model)
        self._optimizer, self._gamma_groups, self._hooks = None, [], []

    @classmethod
    def from_options(cls, model: nn.Module, penalty: Penalty | None, *, beta: float, include=(),
                     exclude=(), channels=None) -> "Sparsifier":
        """Built by :func:`make_sparsifier`, whose options a sparsifier with options of its own reads here."""
        return cls(model, penalty, include, exclude, channels)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Sparsifier":
        """Run :meth:`before_step` and :meth:`after_step` around every ``optimizer.step()``."""
        self.remove()
        group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [name for name, g in zip(self.bns, self.gammas) if id(g) not in group_of]
        if missing:
            raise ValueError(f"{missing[0]}.weight (BN γ) is not in the optimizer's param groups; "
                             f"build the optimizer over the model's parameters, or exclude that BN")
        self._optimizer = optimizer
        self._gamma_groups = sorted({group_of[id(g)] for g in self.gammas})
        self._hooks = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(self.gamma_lr())),
        ]
        return self

    def gamma_lr(self) -> float:
        """The learning rate of the param group holding the regularised γ (one rate for all of them)."""
        rates = {self._optimizer.param_groups[i]["lr"] for i in self._gamma_groups}
        if len(rates) > 1:
            raise ValueError(f"the regularised BN γ sit in param groups with different learning rates "
                             f"{sorted(rates)}; put them in one group")
        return float(rates.pop()) if rates else 0.0

    def remove(self) -> None:
        """Detach from the optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._optimizer, self._gamma_groups, self._hooks = None, [], []

    def flat_gamma(self) -> torch.Tensor:
        if not self.gammas:
            return torch.zeros(0)
        return torch.cat([g.detach().reshape(-1) for g in self.gammas])

    def penalised(self, flat: torch.Tensor) -> torch.Tensor:
        """The entries of a flat γ-shaped vector that carry the penalty (all without ``channels``)."""
        return flat if self.mask is None else flat[self.mask]

    def only_penalised(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` where the penalty acts, ``old`` elsewhere."""
        return new if self.mask is None else torch.where(self.mask, new, old)

    def before_step(self) -> None:
        """Called after backward (gradients unscaled) and before ``optimizer.step()``."""

    def after_step(self, lr: float) -> None:
        """Called after ``optimizer.step()`` with the learning rate that step used."""

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-BN channel scores for the pruning plan: |γ| by default."""
        return {name: bn.weight.detach().abs().clone() for name, bn in self.bns.items()}

    def penalty_value(self) -> float:
        return float(self.penalty.value(self.penalised(self.flat_gamma()))) if self.penalty and self.gammas else 0.0

    def summary(self) -> ProximalSummary | None:
        """What the run report records of the sparsifier's own state (None: nothing beyond the scores)."""
        return None

    def state_dict(self) -> dict:
        return {"method": self.method}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.method:
            raise ValueError(f"sparsifier state is for {state.get('method')!r}, not {self.method!r}")


@SPARSIFIERS.register("subgradient", description="∂p_λ(γ) added to the γ gradients (network slimming)")
class SubgradientSparsifier(Sparsifier):
    method = "subgradient"
    uses_penalty = True

    @torch.no_grad()
    def before_step(self) -> None:
        if not self.gammas:
            return
        grads = []
        for g in self.gammas:
            if g.grad is None:
                g.grad = torch.zeros_like(g)
            grads.append(g.grad)
        step = self.penalty.grad(self.flat_gamma())
        step = self.only_penalised(step, torch.zeros_like(step))
        torch._foreach_add_(grads, list(step.split(self.sizes)))


@SPARSIFIERS.register("proximal", description="proximal NS: γ/ξ splitting, ξ holds exact zeros")
class ProximalSparsifier(Sparsifier):
    """Proximal NS: γ/ξ splitting, ξ updated by the penalty's prox and holding exact zeros."""

    method = "proximal"
    uses_penalty = True

    def __init__(self, model, penalty, beta: float, include=(), exclude=(), channels=None):
        super().__init__(model, penalty, include, exclude, channels)
        self.beta = float(beta)
        # ξ starts at γ, so the coupling term starts at zero.
        self.xi = [g.detach().clone() for g in self.gammas]

    @classmethod
    def from_options(cls, model, penalty, *, beta, include=(), exclude=(), channels=None) -> "ProximalSparsifier":
        return cls(model, penalty, beta, include, exclude, channels)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if not self.gammas or lr <= 0:  # a step of size 0 moved no γ; ξ stays as it is
            return
        alpha, beta = 1.0 / lr, self.beta
        w = alpha / (alpha + beta)
        if self.mask is None:
            # γ ← w·γ + (1 − w)·ξ
            torch._foreach_mul_(self.gammas, w)
            torch._foreach_add_(self.gammas, self.xi, alpha=1 - w)
            # ξ ← prox_{p_λ/(α+β)}(w·ξ + (1 − w)·γ)
            new_xi = self.penalty.prox(self.flat_xi() * w + self.flat_gamma() * (1 - w), 1.0 / (alpha + beta))
        else:  # the same on the penalised channels; the others keep their γ, and ξ = γ there
            gamma, xi = self.flat_gamma(), self.flat_xi()
            new_gamma = self.only_penalised(gamma * w + xi * (1 - w), gamma)
            new_xi = self.only_penalised(self.penalty.prox(xi * w + new_gamma * (1 - w), 1.0 / (alpha + beta)),
                                         new_gamma)
            # A listed channel whose ξ reached 0 is out from then on: γ and the shift β are held at 0, so it
            # outputs 0 and the later layers learn without it. Coupled to ξ = 0 alone, γ lingers near
            # −lr·∂L/∂γ and the next layer learns to amplify it (γ of 0.02 carried half the logits of a
            # ResNet-20); a constant β would need a per-position map after removal, where zero padding
            # makes its contribution vary (one per block cost ResNet-20 a fifth of its speedup).
            out = self.mask & (new_xi == 0)
            new_gamma = new_gamma.masked_fill(out, 0)
            betas = [bn.bias for bn in self.bns.values()]
            kept_beta = torch.cat([b.detach().reshape(-1) for b in betas]).masked_fill(out, 0)
            torch._foreach_copy_(betas, [x.view_as(b) for x, b in zip(kept_beta.split(self.sizes), betas)])
            torch._foreach_copy_(self.gammas, [x.view_as(g) for x, g in zip(new_gamma.split(self.sizes), self.gammas)])
        torch._foreach_copy_(self.xi, [x.view_as(old) for x, old in zip(new_xi.split(self.sizes), self.xi)])

    def flat_xi(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in self.xi]) if self.xi else torch.zeros(0)

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: xi.abs().clone() for name, xi in zip(self.bns, self.xi)}

    def penalty_value(self) -> float:
        return float(self.penalty.value(self.penalised(self.flat_xi()))) if self.xi else 0.0

    def zero_summary(self) -> dict:
        """How many ξ are exactly zero, and how large the γ of those channels still are."""
        xi = self.flat_xi()
        gamma = self.flat_gamma()
        zero = xi == 0
        g = gamma[zero].abs()
        return {
            "xi_zeros": int(zero.sum()),
            "channels": int(xi.numel()),
            "gamma_nonzero_at_xi_zero": int((g > 0).sum()),
            "gamma_max_abs_at_xi_zero": float(g.max()) if g.numel() else 0.0,
            "gamma_mean_abs_at_xi_zero": float(g.mean()) if g.numel() else 0.0,
        }

    def summary(self) -> ProximalSummary:
        return ProximalSummary(**self.zero_summary())

    def state_dict(self) -> dict:
        return {"method": self.method, "xi": {name: x.clone() for name, x in zip(self.bns, self.xi)}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, x in zip(self.bns, self.xi):
            x.copy_(state["xi"][name].to(x.device))


@SPARSIFIERS.register("prox_sgd", description="proximal gradient on γ itself")
class ProxSGDSparsifier(Sparsifier):
    method = "prox_sgd"
    uses_penalty = True

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if not self.gammas:
            return
        gamma = self.flat_gamma()
        new = self.only_penalised(self.penalty.prox(gamma, lr), gamma)
        torch._foreach_copy_(self.gammas, [x.view_as(g) for x, g in zip(new.split(self.sizes), self.gammas)])


def make_sparsifier(
    model: nn.Module,
    method: str = "subgradient",
    penalty: str | Penalty = "l1",
    lam: float = 1e-4,
    *,
    p: float = 0.5,
    a: float | None = None,
    beta: float = 100.0,
    include=(),
    exclude=(),
    channels: dict[str, list[int]] | None = None,
) -> Sparsifier:
    """The sparsifier ``method`` (one of ``SPARSIFIERS.names()``) with a penalty on the selected BN γ.

    ``penalty`` is a :class:`Penalty` or a name for :func:`slimdeploy.penalties.get` with ``lam``, ``p``
    (lp) and ``a`` (tl1, mcp, scad; None: the penalty's default). ``beta`` is proximal NS's coupling.
    ``channels``: per BN name, the channel indices the penalty acts on (None: every channel).
    """
    cls = SPARSIFIERS.get(method)
    if not cls.uses_penalty:
        penalty = None
    elif not isinstance(penalty, Penalty):
        penalty = penalties.get(penalty, lam, p=p, a=a)
    options = dict(beta=beta, include=include, exclude=exclude)
    if channels is not None:  # passed only when given: a sparsifier registered elsewhere may not take it
        if "channels" not in inspect.signature(cls.from_options).parameters:
            raise ValueError(f"sparsity method {method!r} cannot put its penalty on chosen channels "
                             f"(its from_options takes no channels)")
        options["channels"] = channels
    return cls.from_options(model, penalty, **options)


def _channel_mask(bns: dict[str, nn.Module], channels: dict[str, list[int]], model: nn.Module) -> torch.Tensor:
    """The flat mask over the γ of ``bns`` that is True at the listed channels."""
    known = affine_bns(model)
    for name, idxs in channels.items():
        if name not in known:
            raise ValueError(f"channels: {name!r} is not a BN layer with γ in the model")
        size = known[name].weight.numel()
        if any(not 0 <= int(i) < size for i in idxs):
            raise ValueError(f"channels: {name} has {size} channels, got indices {sorted(idxs)}")
    masks = []
    for name, bn in bns.items():
        mask = torch.zeros(bn.weight.numel(), dtype=torch.bool, device=bn.weight.device)
        mask[[int(i) for i in channels[name]]] = True
        masks.append(mask)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
