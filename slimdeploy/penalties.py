r"""Sparsity penalties on BatchNorm scaling factors.

Each penalty is a separable sum ``P(x) = sum_i p_lam(x_i)`` with scalar ``p_lam``:

* ``l1``   -- ``lam*|x|`` (network slimming, Liu et al. 2017).
* ``lp``   -- ``lam*|x|**p``, 0 < p < 1 (bridge penalty).
* ``tl1``  -- transformed L1, ``lam*(a+1)|x|/(a+|x|)``, a > 0 (Zhang & Xin 2017).
* ``mcp``  -- minimax concave penalty (Zhang 2010), a > 1:
  ``lam|x| - x**2/(2a)`` for ``|x| <= a*lam``, ``a*lam**2/2`` beyond.
* ``scad`` -- smoothly clipped absolute deviation (Fan & Li 2001), a > 2:
  ``lam|x|`` for ``|x| <= lam``; ``(2a*lam|x| - x**2 - lam**2)/(2(a-1))`` up to
  ``a*lam``; ``(a+1)*lam**2/2`` beyond.

Every penalty object offers ``value(x)`` (the sum, a 0-dim tensor), ``grad(x)``
(elementwise subgradient, 0 at x = 0) and ``prox(v, step)``, the elementwise
global minimiser of ``0.5*(x-v)**2 + step*p_lam(x)``.  With ``s = step*lam``
and ``u = |v|`` (every prox is ``sign(v) * x(u)``, and 0 at or below its threshold):

* l1:   soft thresholding, ``x = max(u - s, 0)``.
* lp, p=1/2: half thresholding (Xu et al. 2012), threshold ``1.5*s**(2/3)``
  (their ``(54**(1/3)/4)*lam'**(2/3)`` with ``lam' = 2s`` for this 1/2-scaled
  objective), ``x = (2/3)u(1 + cos(2pi/3 - (2/3)phi))``, ``phi = arccos((s/4)(u/3)**-1.5)``.
* lp, p=2/3: Cao, Sun & Xu 2013, threshold ``2(2s/3)**(3/4)``,
  ``x = ((A + sqrt(2u/A - A**2))/2)**3``, ``A = (2/sqrt3)(2s)**(1/4)cosh(phi/3)**(1/2)``,
  ``phi = arccosh((27/16)u**2(2s)**(-3/2))``.
* lp, other p: GISA (Zuo et al. 2013), threshold
  ``tau = (2s(1-p))**(1/(2-p)) + s*p*(2s(1-p))**((p-1)/(2-p))``; above it, the
  root of ``x + s*p*x**(p-1) = u`` by Newton's method started at ``u``.
* tl1:  Zhang & Xin 2017, threshold ``s(a+1)/a`` if ``s <= a**2/(2(a+1))`` else
  ``sqrt(2s(a+1)) - a/2``; ``x = (2/3)(a+u)cos(phi/3) - 2a/3 + u/3``,
  ``phi = arccos(1 - 27s*a(a+1)/(2(a+u)**3))``.
* mcp:  firm thresholding when ``a > step``: ``0`` for ``u <= s``,
  ``(u - s)/(1 - step/a)`` up to ``a*lam``, ``u`` beyond; when ``a <= step``
  hard thresholding at ``lam*sqrt(a*step)``.
* scad: when ``a > 1 + step``: ``max(u - s, 0)`` for ``u <= lam + s``,
  ``((a-1)u - a*s)/(a-1-step)`` up to ``a*lam``, ``u`` beyond; when
  ``a <= 1 + step`` the better (by objective) of ``clip(u - s, 0, lam)`` and
  ``max(u, a*lam)``.

At thresholds where the nonconvex objective has two global minimisers the
returned one is unspecified.  ``prox`` computes in float64 and casts back to the
input dtype; ``value`` and ``grad`` compute in the input dtype.

Use :func:`get` to build a penalty by name.
"""

from __future__ import annotations

import math

import torch

from slimdeploy.registry import Registry

__all__ = [
    "PENALTIES",
    "Penalty",
    "L1Penalty",
    "LpPenalty",
    "TL1Penalty",
    "MCPPenalty",
    "SCADPenalty",
    "get",
    "gisa_prox_abs",
]

PENALTIES: Registry[type["Penalty"]] = Registry("penalty")


def _check_tensor(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    return x


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # MPS has no float64; everywhere else the prox is computed in float64.
    return torch.float32 if x.device.type == "mps" else torch.float64


class Penalty:
    """Base class: ``value``/``grad``/``prox`` built on three per-penalty hooks."""

    name: str = ""
    _params: tuple[str, ...] = ()

    def __init__(self, lam: float):
        lam = float(lam)
        if not (0.0 <= lam < math.inf):
            raise ValueError(f"lam must be a finite number >= 0, got {lam}")
        self.lam = lam

    # -- hooks (elementwise, on tensors) ------------------------------------
    def _pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """p_lam(x) elementwise."""
        raise NotImplementedError

    def _dabs(self, ax: torch.Tensor) -> torch.Tensor:
        """Derivative of p_lam(t) in t at t = |x| > 0."""
        raise NotImplementedError

    def _prox_abs(self, u: torch.Tensor, step: float) -> torch.Tensor:
        """Minimiser over x >= 0 of 0.5*(x-u)**2 + step*p_lam(x), for u = |v| >= 0."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------
    def value(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of p_lam over all elements of ``x`` (0-dim tensor, differentiable)."""
        return self._pointwise(_check_tensor(x, "x")).sum()

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise subgradient of p_lam, with the choice 0 at x == 0."""
        x = _check_tensor(x, "x")
        return torch.sign(x) * self._dabs(x.abs())

    def prox(self, v: torch.Tensor, step: float) -> torch.Tensor:
        """Elementwise global argmin_x 0.5*(x-v)**2 + step*p_lam(x)."""
        v = _check_tensor(v, "v")
        step = float(step)
        if not (0.0 < step < math.inf):
            raise ValueError(f"step must be a finite number > 0, got {step}")
        if self.lam == 0.0:
            return v.clone()
        w = v.to(_work_dtype(v))
        x = torch.sign(w) * self._prox_abs(w.abs(), step)
        return x.to(v.dtype)

    def _objective(self, x: torch.Tensor, u: torch.Tensor, step: float) -> torch.Tensor:
        return 0.5 * (x - u) ** 2 + step * self._pointwise(x)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in self._params)
        return f"{type(self).__name__}(lam={self.lam!r}{extra})"


@PENALTIES.register("l1", description="lam*|x| (network slimming)")
class L1Penalty(Penalty):
    """``lam*|x|``; prox is soft thresholding."""

    name = "l1"

    def _pointwise(self, x):
        return self.lam * x.abs()

    def _dabs(self, ax):
        return torch.full_like(ax, self.lam)

    def _prox_abs(self, u, step):
        return torch.clamp(u - step * self.lam, min=0.0)


@PENALTIES.register("lp", description="lam*|x|**p, 0 < p < 1")
class LpPenalty(Penalty):
    """``lam*|x|**p`` with 0 < p < 1.

    The derivative ``lam*p*|x|**(p-1)`` is unbounded at 0.  ``grad`` returns
    exactly 0 at x == 0 (so SGD momentum is never fed inf or NaN) and evaluates
    the derivative at ``max(|x|, eps)``, so ``|grad| <= lam*p*eps**(p-1)``
    everywhere.  The default ``eps = 1e-6`` is about 8 float32 ulps at 1.0
    (BN scales start at O(1)): a channel with ``|gamma| < 1e-6`` is numerically
    dead and far below any pruning threshold, so the clamp never alters the
    gradient of a channel whose fate is still open, while the bound on the
    gradient is ``100**(1-p)`` times smaller than with eps = 1e-8 (e.g. 0.05
    instead of 0.5 for lam = 1e-4, p = 1/2).  Near 0 the subgradient still
    makes SGD overshoot and chatter; for exact zeros use ``prox`` (proximal SGD).

    ``value`` is autograd-safe as well: its autograd gradient is 0 at x == 0.
    """

    name = "lp"
    _params = ("p", "eps")

    def __init__(self, lam: float, p: float = 0.5, eps: float = 1e-6):
        super().__init__(lam)
        p, eps = float(p), float(eps)
        if not (0.0 < p < 1.0):
            raise ValueError(f"p must be in (0, 1), got {p}")
        if not (0.0 < eps < math.inf):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.p, self.eps = p, eps

    def _pointwise(self, x):
        ax = x.abs()
        nz = ax > 0
        safe = torch.where(nz, ax, torch.ones_like(ax))  # keeps pow's backward finite at 0
        return self.lam * torch.where(nz, safe.pow(self.p), torch.zeros_like(ax))

    def _dabs(self, ax):
        return self.lam * self.p * ax.clamp(min=self.eps).pow(self.p - 1.0)

    def _prox_abs(self, u, step):
        s, p = step * self.lam, self.p
        if p == 0.5:
            tau = 1.5 * s ** (2.0 / 3.0)
            us = u.clamp(min=tau)
            phi = torch.acos(((s / 4.0) * (us / 3.0).pow(-1.5)).clamp(-1.0, 1.0))
            x = (2.0 / 3.0) * us * (1.0 + torch.cos(2.0 * math.pi / 3.0 - (2.0 / 3.0) * phi))
        elif abs(p - 2.0 / 3.0) < 1e-12:
            c = 2.0 * s / 3.0  # stationarity with x = t**3: t**4 - u*t + c = 0 (Ferrari)
            tau = 2.0 * c**0.75
            us = u.clamp(min=tau)
            arg = (27.0 / 16.0) * us.pow(2) * (2.0 * s) ** -1.5
            y = 2.0 * math.sqrt(c / 3.0) * torch.cosh(torch.acosh(arg.clamp(min=1.0)) / 3.0)
            A = torch.sqrt(2.0 * y)
            x = (0.5 * (A + torch.sqrt((2.0 * us / A - A.pow(2)).clamp(min=0.0)))).pow(3)
        else:
            return gisa_prox_abs(u, s, p)
        return torch.where(u > tau, x, torch.zeros_like(u))


def gisa_prox_abs(u: torch.Tensor, s: float, p: float) -> torch.Tensor:
    """Minimiser over x >= 0 of ``0.5*(x-u)**2 + s*x**p`` for ``u >= 0`` and any 0 < p < 1, by GISA
    (Zuo et al. 2013): 0 up to the threshold ``tau``, above it the root of ``x + s*p*x**(p-1) = u``.

    :class:`LpPenalty` uses it where no closed form exists (p other than 1/2 and 2/3); for those two it
    is the independent reference the closed forms are checked against.
    """
    if not (0.0 < s < math.inf and 0.0 < p < 1.0):
        raise ValueError(f"gisa_prox_abs needs a finite s > 0 and p in (0, 1), got s={s}, p={p}")
    x_tau = (2.0 * s * (1.0 - p)) ** (1.0 / (2.0 - p))
    c = s * p
    tau = x_tau + c * x_tau ** (p - 1.0)
    target = u.clamp(min=tau)
    # f(x) = x + c*x**(p-1) - u is increasing and convex on [x_tau, inf) and the
    # root lies there, so Newton from x = u decreases monotonically to it.  f is
    # evaluated to about eps*u, so iterate until the steps are that small.
    tol = 4.0 * torch.finfo(u.dtype).eps * target
    x = target.clone()
    for _ in range(60):
        f = x + c * x.pow(p - 1.0) - target
        fp = 1.0 - c * (1.0 - p) * x.pow(p - 2.0)
        x_new = torch.clamp(x - f / fp, min=x_tau)
        done = bool(((x - x_new).abs() <= tol).all())
        x = x_new
        if done:
            break
    return torch.where(u > tau, x, torch.zeros_like(u))


@PENALTIES.register("tl1", description="transformed L1, lam*(a+1)|x|/(a+|x|), a > 0")
class TL1Penalty(Penalty):
    """Transformed L1, ``lam*(a+1)|x|/(a+|x|)`` with a > 0 (Zhang & Xin 2017).

    Interpolates between L0 (a -> 0) and L1 (a -> inf)."""

    name = "tl1"
    _params = ("a",)

    def __init__(self, lam: float, a: float = 1.0):
        super().__init__(lam)
        a = float(a)
        if not (0.0 < a < math.inf):
            raise ValueError(f"a must be in (0, inf) for tl1, got {a}")
        self.a = a

    def _pointwise(self, x):
        ax = x.abs()
        return self.lam * (self.a + 1.0) * ax / (self.a + ax)

    def _dabs(self, ax):
        return self.lam * (self.a + 1.0) * self.a / (self.a + ax).pow(2)

    def _prox_abs(self, u, step):
        a, s = self.a, step * self.lam
        if s <= a * a / (2.0 * (a + 1.0)):
            t = s * (a + 1.0) / a
        else:
            t = math.sqrt(2.0 * s * (a + 1.0)) - a / 2.0
        # Same formula, rearranged to avoid cancellation when a >> u or phi ~ 0:
        # phi = arccos(1 - d) = 2*arcsin(sqrt(d/2)) and x = u - (4/3)(a+u)sin(phi/6)**2.
        d = 27.0 * s * a * (a + 1.0) / (2.0 * (a + u).pow(3))
        phi = 2.0 * torch.asin(torch.sqrt(0.5 * d).clamp(max=1.0))
        x = u - (4.0 / 3.0) * (a + u) * torch.sin(phi / 6.0).pow(2)
        return torch.where(u > t, x.clamp(min=0.0), torch.zeros_like(u))


@PENALTIES.register("mcp", description="minimax concave penalty, a > 1")
class MCPPenalty(Penalty):
    """Minimax concave penalty with a > 1 (Zhang 2010)."""

    name = "mcp"
    _params = ("a",)

    def __init__(self, lam: float, a: float = 3.0):
        super().__init__(lam)
        a = float(a)
        if not (1.0 < a < math.inf):
            raise ValueError(f"a must be in (1, inf) for mcp, got {a}")
        self.a = a

    def _pointwise(self, x):
        ax = x.abs()
        lam, a = self.lam, self.a
        inner = lam * ax - ax.pow(2) / (2.0 * a)
        return torch.where(ax <= a * lam, inner, torch.full_like(ax, 0.5 * a * lam * lam))

    def _dabs(self, ax):
        return torch.clamp(self.lam - ax / self.a, min=0.0)

    def _prox_abs(self, u, step):
        lam, a = self.lam, self.a
        if a > step:  # firm thresholding
            mid = (u - step * lam) * (a / (a - step))
            x = torch.where(u <= a * lam, mid, u)
            return torch.where(u <= step * lam, torch.zeros_like(u), x)
        # a <= step: the inner piece is concave (or linear), so the candidates are 0 and
        # u (if u > a*lam); objectives u**2/2 and step*a*lam**2/2 tie at lam*sqrt(a*step).
        return torch.where(u > lam * math.sqrt(a * step), u, torch.zeros_like(u))


@PENALTIES.register("scad", description="smoothly clipped absolute deviation, a > 2")
class SCADPenalty(Penalty):
    """Smoothly clipped absolute deviation with a > 2 (Fan & Li 2001)."""

    name = "scad"
    _params = ("a",)

    def __init__(self, lam: float, a: float = 3.7):
        super().__init__(lam)
        a = float(a)
        if not (2.0 < a < math.inf):
            raise ValueError(f"a must be in (2, inf) for scad, got {a}")
        self.a = a

    def _pointwise(self, x):
        ax = x.abs()
        lam, a = self.lam, self.a
        mid = (2.0 * a * lam * ax - ax.pow(2) - lam * lam) / (2.0 * (a - 1.0))
        outer = torch.full_like(ax, 0.5 * (a + 1.0) * lam * lam)
        return torch.where(ax <= lam, lam * ax, torch.where(ax <= a * lam, mid, outer))

    def _dabs(self, ax):
        lam, a = self.lam, self.a
        outer = torch.clamp(a * lam - ax, min=0.0) / (a - 1.0)
        return torch.where(ax <= lam, torch.full_like(ax, lam), outer)

    def _prox_abs(self, u, step):
        lam, a = self.lam, self.a
        s = step * lam
        if a > 1.0 + step:  # convex objective: three-piece SCAD thresholding
            mid = ((a - 1.0) * u - a * s) / (a - 1.0 - step)
            x = torch.where(u <= a * lam, mid, u)
            return torch.where(u <= lam + s, torch.clamp(u - s, min=0.0), x)
        # a <= 1 + step: the middle piece is concave (or linear), so the global
        # minimiser is the best of the inner piece's minimiser and the outer one's.
        inner = torch.clamp(u - s, min=0.0, max=lam)
        outer = torch.clamp(u, min=a * lam)
        better_inner = self._objective(inner, u, step) <= self._objective(outer, u, step)
        return torch.where(better_inner, inner, outer)


def get(name: str, lam: float, **params) -> Penalty:
    """Build the penalty ``name`` (one of ``PENALTIES.names()``) with weight ``lam``.

    ``params`` may hold ``p`` (lp), ``a`` (tl1, mcp, scad) and ``eps`` (lp);
    parameters a penalty does not use, or given as None, are ignored.
    """
    cls = PENALTIES.get(str(name).strip().lower())
    kwargs = {k: params[k] for k in cls._params if params.get(k) is not None}
    return cls(lam, **kwargs)
