"""Tests for slimdeploy.penalties: prox against brute force, grad against autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimdeploy import penalties
from slimdeploy.penalties import PENALTIES, get

PENALTY_NAMES = PENALTIES.names()

DEFAULTS = {"lp": {"p": 0.5}, "tl1": {"a": 1.0}, "mcp": {"a": 3.0}, "scad": {"a": 3.7}, "l1": {}}
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- reference
def ref_pointwise(name: str, lam: float, prm: dict, x: np.ndarray) -> np.ndarray:
    """Scalar penalties written out independently of the module (float64 numpy)."""
    ax = np.abs(x)
    if name == "l1":
        return lam * ax
    if name == "lp":
        return lam * ax ** prm["p"]
    a = prm["a"]
    if name == "tl1":
        return lam * (a + 1) * ax / (a + ax)
    if name == "mcp":
        return np.where(ax <= a * lam, lam * ax - ax**2 / (2 * a), a * lam**2 / 2)
    if name == "scad":
        mid = (2 * a * lam * ax - ax**2 - lam**2) / (2 * (a - 1))
        return np.where(ax <= lam, lam * ax, np.where(ax <= a * lam, mid, (a + 1) * lam**2 / 2))
    raise AssertionError(name)


def ref_dabs(name: str, lam: float, prm: dict, t: np.ndarray) -> np.ndarray:
    """Derivative of p_lam at t > 0."""
    if name == "l1":
        return np.full_like(t, lam)
    if name == "lp":
        return lam * prm["p"] * t ** (prm["p"] - 1)
    a = prm["a"]
    if name == "tl1":
        return lam * (a + 1) * a / (a + t) ** 2
    if name == "mcp":
        return np.maximum(lam - t / a, 0.0)
    if name == "scad":
        return np.where(t <= lam, lam, np.maximum(a * lam - t, 0.0) / (a - 1))
    raise AssertionError(name)


def kinks(name: str, lam: float, prm: dict) -> list[float]:
    """Nonnegative points where p_lam is not twice differentiable."""
    if name == "mcp":
        return [0.0, prm["a"] * lam]
    if name == "scad":
        return [0.0, lam, prm["a"] * lam]
    return [0.0]


def analytic_thresholds(name: str, lam: float, prm: dict, step: float) -> list[float]:
    """|v| values where the prox changes regime (convex formulas and known ties)."""
    s = step * lam
    if name == "l1":
        return [s]
    if name == "lp":
        p = prm["p"]
        x_tau = (2 * s * (1 - p)) ** (1 / (2 - p))
        out = [x_tau + s * p * x_tau ** (p - 1)]
        if p == 0.5:  # threshold of the un-halved objective (x-v)**2 + lam'|x|**(1/2) with lam' = s
            out.append(54 ** (1 / 3) / 4 * s ** (2 / 3))
        return out
    a = prm["a"]
    if name == "tl1":
        return [t for t in (s * (a + 1) / a, math.sqrt(2 * s * (a + 1)) - a / 2) if t > 0]
    if name == "mcp":
        return [s, a * lam, lam * math.sqrt(a * step)]
    if name == "scad":
        return [s, lam + s, a * lam, lam * math.sqrt(step * (a + 1)), lam * (a + 1 + step) / 2]
    raise AssertionError(name)


def jump_points(pen, step: float, vmax: float, n: int = 2001) -> list[float]:
    """Locate discontinuities of v -> prox(v) on [0, vmax] by bisection (both sides)."""
    v = torch.linspace(0.0, vmax, n, dtype=torch.float64)
    x = pen.prox(v, step)
    idx = torch.nonzero((x[1:] - x[:-1]).abs() > 5 * (v[1] - v[0])).flatten()[:16]
    if idx.numel() == 0:
        return []
    lo, hi, xlo, xhi = v[idx], v[idx + 1], x[idx], x[idx + 1]
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        xm = pen.prox(mid, step)
        left = (xm - xlo).abs() >= (xhi - xm).abs()
        hi, xhi = torch.where(left, mid, hi), torch.where(left, xm, xhi)
        lo, xlo = torch.where(left, lo, mid), torch.where(left, xlo, xm)
    keep = (xhi - xlo).abs() > 1e-9 * vmax
    return torch.cat([lo[keep], hi[keep]]).tolist()


def probe_values(name, lam, prm, step, pen) -> np.ndarray:
    """Sweep of 24 points, then points at and around every threshold; then all negated."""
    ts = [t for t in analytic_thresholds(name, lam, prm, step) if t > 0]
    vmax = 2.0 * max(ts + [k for k in kinks(name, lam, prm) if k > 0])
    ts += jump_points(pen, step, vmax)
    ts = sorted(ts)
    ts += [0.5 * (t0 + t1) for t0, t1 in zip(ts, ts[1:])]
    rel = np.array([0.0, 1e-12, -1e-12, 1e-9, -1e-9, 1e-6, -1e-6, 1e-3, -1e-3])
    near = (np.array(ts)[:, None] * (1.0 + rel)[None, :]).ravel()
    v = np.concatenate([np.linspace(0.0, vmax, 24), near])
    return np.concatenate([v, -v])


# ------------------------------------------------------------------------ brute force
def check_prox_against_brute_force(name, lam, prm, step, n=10001):
    pen = get(name, lam, **prm)
    v = probe_values(name, lam, prm, step, pen)
    x = pen.prox(torch.from_numpy(v), step).numpy()

    # odd symmetry, to rounding: vectorised pow may differ by an ulp across lanes, and near the Lp
    # threshold Newton divides by f' -> 0, which made that 3e-14 relative (p = 0.99)
    half = len(v) // 2
    np.testing.assert_array_equal(x[half:] == 0, x[:half] == 0)
    np.testing.assert_allclose(x[half:], -x[:half], rtol=1e-12, atol=0)

    # grid on [0, v] (the minimiser lies between 0 and v) plus the kinks of p_lam
    t = np.linspace(0.0, 1.0, n)
    extra = np.array(kinks(name, lam, prm))
    at_kinks = np.sign(v)[:, None] * np.minimum(extra[None, :], np.abs(v)[:, None])
    grid = np.concatenate([v[:, None] * t[None, :], at_kinks], 1)
    grid.sort(axis=1)
    F = 0.5 * (grid - v[:, None]) ** 2 + step * ref_pointwise(name, lam, prm, grid)
    Fmin = F.min(axis=1)
    h = np.abs(v) / (n - 1)
    rnd = 1e-12 * v**2 + 1e-300  # float64 rounding of F, which is at most v**2 / 2

    # objective: prox is never worse than the grid minimum
    Fx = 0.5 * (x - v) ** 2 + step * ref_pointwise(name, lam, prm, x)
    bad = Fx > Fmin + rnd
    assert not bad.any(), (pen, step, v[bad], x[bad], Fx[bad] - Fmin[bad])

    # argmin: F'' <= 1 everywhere and the kinks are grid points, so the grid point
    # nearest to a global minimiser is within h**2/8 of the minimum.  If the
    # near-minimal grid points form one contiguous run, the minimiser lies in it.
    near = F <= Fmin[:, None] + 1.01 * h[:, None] ** 2 / 8 + rnd[:, None]
    runs = (np.diff(near.astype(np.int8), axis=1) == 1).sum(1) + near[:, 0]
    unique = runs == 1
    lo = np.where(near, grid, np.inf).min(1) - h - rnd
    hi = np.where(near, grid, -np.inf).max(1) + h + rnd
    off = unique & ((x < lo) | (x > hi))
    assert not off.any(), (pen, step, v[off], x[off], lo[off], hi[off])
    # stationarity: a nonzero minimiser off the kinks solves x - v + step*p'(x) = 0
    # (this checks the smooth-piece solutions to float64 accuracy, not just to h)
    ax = np.abs(x)
    smooth = (ax > 0) & (np.abs(ax[:, None] - extra[None, :]).min(1) > 1e-9 * np.abs(v))
    resid = x - v + step * np.sign(x) * ref_dabs(name, lam, prm, np.where(smooth, ax, 1.0))
    stuck = smooth & (np.abs(resid) > 1e-11 * np.abs(v))
    assert not stuck.any(), (pen, step, v[stuck], x[stuck], resid[stuck])

    sweep = np.r_[0:24, half : half + 24]
    assert unique[sweep].mean() > 0.8, "argmin check was mostly skipped"


def _logu(lo, hi):
    return st.floats(lo, hi).map(lambda e: 10.0**e)


@st.composite
def cases(draw, name):
    lam = draw(_logu(-4, 0.5))
    if name == "l1":
        return {}, lam, draw(_logu(-2, 1))
    if name == "lp":
        p = draw(st.one_of(st.sampled_from([0.5, 2 / 3, 0.75]), st.floats(0.01, 0.99)))
        return {"p": p}, lam, draw(_logu(-2, 1))
    if name == "tl1":
        a = draw(st.one_of(st.just(1.0), _logu(-2, 2)))
        return {"a": a}, lam, draw(_logu(-2, 1.5))
    # mcp (a > 1, convex iff a > step) and scad (a > 2, convex iff a > 1 + step)
    base, shift = (1.0, 0.0) if name == "mcp" else (2.0, 1.0)
    regime = draw(st.sampled_from(["convex", "nonconvex", "boundary"]))
    if regime == "convex":
        step = draw(_logu(-2, 1))
        a = max(base, step + shift) * (1.0 + draw(_logu(-3, 1)))
    else:
        step = draw(st.floats(base - shift + 0.05, 10.0))  # so that base < step + shift
        if regime == "boundary":
            a = step + shift
        else:
            a = base + (step + shift - base) * draw(st.floats(1e-3, 1.0))
        a = max(a, math.nextafter(base, math.inf))
    return {"a": a}, lam, step


@pytest.mark.slow
@pytest.mark.parametrize("name", PENALTY_NAMES)
@HYP
@given(data=st.data())
def test_prox_matches_brute_force(name, data):
    prm, lam, step = data.draw(cases(name))
    check_prox_against_brute_force(name, lam, prm, step)


FIXED = [
    ("l1", {}, 1e-4, 0.1),
    ("l1", {}, 0.5, 2.0),
    ("lp", {"p": 0.5}, 0.3, 1.0),
    ("lp", {"p": 2 / 3}, 0.3, 1.0),
    ("lp", {"p": 0.75}, 0.3, 1.0),
    ("lp", {"p": 0.1}, 1e-3, 0.5),
    ("lp", {"p": 0.95}, 1.0, 3.0),
    ("tl1", {"a": 1.0}, 0.1, 1.0),  # first threshold regime
    ("tl1", {"a": 0.1}, 1.0, 1.0),  # second threshold regime
    ("mcp", {"a": 3.0}, 0.2, 1.0),  # firm thresholding
    ("mcp", {"a": 2.0}, 0.2, 2.0),  # a == step
    ("mcp", {"a": 1.5}, 0.2, 4.0),  # hard thresholding
    ("scad", {"a": 3.7}, 0.2, 1.0),
    ("scad", {"a": 3.0}, 0.2, 2.0),  # a == 1 + step
    ("scad", {"a": 2.5}, 0.2, 5.0),  # nonconvex
    ("scad", {"a": 3.7}, 0.2, 8.0),  # nonconvex, default a
]


@pytest.mark.parametrize("name,prm,lam,step", FIXED)
def test_prox_matches_brute_force_fixed(name, prm, lam, step):
    check_prox_against_brute_force(name, lam, prm, step)


# ------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("p", [0.5, 2 / 3])
@pytest.mark.parametrize("s", [1e-6, 1e-2, 1.0, 30.0])
def test_lp_closed_forms_agree_with_newton(p, s):
    u = torch.logspace(-8, 3, 4001, dtype=torch.float64)
    closed = penalties.LpPenalty(1.0, p=p).prox(u, s)  # lam = 1: the prox of s*|x|**p
    newton = penalties.gisa_prox_abs(u, s, p)
    assert (newton == 0).any() and (newton > 0).any()  # both sides of the threshold
    torch.testing.assert_close(closed, newton, rtol=1e-13, atol=0)


@pytest.mark.parametrize("s, p", [(0.0, 0.5), (1.0, 1.0), (1.0, 0.0)])
def test_gisa_refuses_parameters_outside_its_range(s, p):
    with pytest.raises(ValueError, match=r"s > 0 and p in \(0, 1\)") as err:
        penalties.gisa_prox_abs(torch.ones(3, dtype=torch.float64), s, p)
    assert "\n" not in str(err.value)


def test_lp_half_threshold():
    s = 0.37
    pen = get("lp", 1.0, p=0.5)
    tau = 1.5 * s ** (2 / 3)  # (54**(1/3)/4) * (2s)**(2/3)
    v = torch.tensor([tau * (1 - 1e-9), tau * (1 + 1e-9)], dtype=torch.float64)
    x = pen.prox(v, s)
    assert x[0] == 0 and x[1] > 0
    x_tau = torch.tensor(s ** (2 / 3), dtype=torch.float64)
    torch.testing.assert_close(x[1], x_tau)  # the prox jumps from 0 to x_tau


# ------------------------------------------------------------------- prox basics
ALL = [(n, DEFAULTS[n]) for n in PENALTY_NAMES] + [("lp", {"p": 2 / 3}), ("lp", {"p": 0.3})]


@pytest.mark.parametrize("name,prm", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prox_zero_dtype_shape(name, prm, dtype):
    pen = get(name, 0.1, **prm)
    z = torch.tensor([0.0, -0.0], dtype=dtype)
    assert torch.equal(pen.prox(z, 0.5), torch.zeros(2, dtype=dtype))
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for out in (pen.prox(v, 0.5), pen.grad(v)):
        assert out.dtype == dtype and out.shape == v.shape and out.device == v.device
    val = pen.value(v)
    assert val.dtype == dtype and val.dim() == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", PENALTY_NAMES)
@HYP
@given(data=st.data())
def test_prox_float32_is_rounded_float64(name, data):
    prm, lam, step = data.draw(cases(name))
    pen = get(name, lam, **prm)
    v32 = torch.from_numpy(probe_values(name, lam, prm, step, pen)).float()
    assert torch.equal(pen.prox(v32, step), pen.prox(v32.double(), step).float())


def test_prox_lam_zero_is_identity_and_step_checked():
    v = torch.linspace(-2, 2, 9)
    for name in PENALTY_NAMES:
        pen = get(name, 0.0)
        assert torch.equal(pen.prox(v, 1.0), v)
        assert pen.value(v) == 0
        with pytest.raises(ValueError, match="step"):
            get(name, 0.1).prox(v, 0.0)


# ---------------------------------------------------------------- value and grad
@pytest.mark.parametrize("name", PENALTY_NAMES)
@HYP
@given(data=st.data())
def test_value_and_grad(name, data):
    prm, lam, step = data.draw(cases(name))
    pen = get(name, lam, **prm)
    scale = max(kinks(name, lam, prm) + [lam])
    x = np.array(data.draw(st.lists(st.floats(-3 * scale, 3 * scale), min_size=1, max_size=20)))
    ks = np.array(kinks(name, lam, prm))
    x = x[np.abs(np.abs(x)[:, None] - ks[None, :]).min(1) > 1e-6 * scale]
    if name == "lp":
        x = x[np.abs(x) > pen.eps]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    val = pen.value(xt)
    ref = float(ref_pointwise(name, lam, prm, x).sum())
    torch.testing.assert_close(val.item(), ref, rtol=1e-12, atol=1e-300)
    (auto,) = torch.autograd.grad(val, xt)
    torch.testing.assert_close(pen.grad(xt.detach()), auto, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("name,prm", ALL)
def test_grad_is_zero_at_zero(name, prm):
    pen = get(name, 0.1, **prm)
    for dtype in (torch.float32, torch.float64):
        x = torch.zeros(3, dtype=dtype, requires_grad=True)
        assert torch.equal(pen.grad(x.detach()), torch.zeros(3, dtype=dtype))
        (auto,) = torch.autograd.grad(pen.value(x), x)
        assert torch.isfinite(auto).all()


@pytest.mark.parametrize("p", [0.01, 0.5, 2 / 3, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lp_grad_finite_near_zero(p, dtype):
    pen = get("lp", 10.0, p=p)
    tiny = torch.finfo(dtype).smallest_normal
    x = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 4, 1e-30, -1e-12, pen.eps, 1.0], dtype=dtype)
    g = pen.grad(x)
    assert torch.isfinite(g).all()
    assert g[0] == 0 and g[1] == 0
    bound = 10.0 * p * pen.eps ** (p - 1)
    assert (g.abs() <= bound * (1 + 1e-6)).all()
    assert (torch.sign(g[2:]) == torch.sign(x[2:])).all()
    # momentum stays finite
    buf = torch.zeros_like(x)
    for _ in range(3):
        buf = 0.9 * buf + g
    assert torch.isfinite(buf).all()


# ---------------------------------------------------------------------------- get
def test_get_defaults_and_extra_params():
    assert get("l1", 1e-4, p=0.5, a=1.0).lam == 1e-4
    assert get("lp", 1e-4).p == 0.5
    assert get("tl1", 1e-4).a == 1.0
    assert get("mcp", 1e-4).a == 3.0
    assert get("scad", 1e-4).a == 3.7
    assert get("lp", 1e-4, p=0.3, a=7.0).p == 0.3
    assert get("mcp", 1e-4, p=0.3, a=None).a == 3.0
    assert get("LP", 1e-4, eps=1e-9).eps == 1e-9
    for name in PENALTY_NAMES:
        pen = get(name, 2e-4, p=0.5, a=4.0)
        assert pen.name == name and pen.lam == 2e-4
        r = repr(pen)
        assert type(pen).__name__ in r and "lam=0.0002" in r


@pytest.mark.parametrize(
    "name,lam,params,pattern",
    [
        ("foo", 1e-4, {}, r"unknown penalty 'foo'; allowed: l1, lp, tl1, mcp, scad"),
        ("l1", -1.0, {}, r"lam must be .*>= 0, got -1.0"),
        ("l1", float("nan"), {}, r"lam must be"),
        ("lp", 1e-4, {"p": 1.5}, r"p must be in \(0, 1\), got 1.5"),
        ("lp", 1e-4, {"p": 0.0}, r"p must be in \(0, 1\), got 0.0"),
        ("lp", 1e-4, {"p": 1.0}, r"p must be in \(0, 1\)"),
        ("lp", 1e-4, {"eps": 0.0}, r"eps must be .*> 0"),
        ("tl1", 1e-4, {"a": 0.0}, r"a must be in \(0, inf\) for tl1, got 0.0"),
        ("mcp", 1e-4, {"a": 1.0}, r"a must be in \(1, inf\) for mcp, got 1.0"),
        ("scad", 1e-4, {"a": 2.0}, r"a must be in \(2, inf\) for scad, got 2.0"),
    ],
)
def test_get_errors_name_the_parameter(name, lam, params, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        get(name, lam, **params)
    assert "\n" not in str(info.value)
