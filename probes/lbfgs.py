"""Batched L-BFGS for many multinomial logistic regressions sharing a design matrix.

The machinery behind :func:`uniprobe.probes.solvers.fit_logistic` (whose docstring explains the
method): :class:`Objective` (loss, gradient and preconditioner of one chunk of problems, logits kept
so a line search needs no pass over ``x``), :func:`lbfgs` (each problem with its own history, step
and stopping state; solved problems leave the batch), the Newton line search in logit space, and the
feature :func:`covariance` the preconditioner is built from. Written by hand: no library batches
L-BFGS over thousands of independent problems that share one ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_NEG = -1e30  # logit offset of a class absent from a problem's training set


class Objective:
    """The logistic objective of one chunk: ``P`` problem slots per group sharing ``x``."""

    def __init__(
        self,
        xt: Tensor,
        y: Tensor,
        w: Tensor,
        c: Tensor,
        present: Tensor,
        cov: Tensor | None,
        spectrum: Tensor | None,
    ) -> None:
        total = w.sum(-1).clamp_min(1e-12)  # [G, P]
        self.xt = xt  # [G, D, n] all the chunk's groups; the problems left are in groups ``self.groups``
        self.aug = spectrum is not None  # x ends with a column of ones (a Design)
        self.groups = torch.arange(len(xt))
        self.w = w / total[..., None]  # [G, P, n], each problem's weights sum to 1
        self.lam = 1.0 / (c * total)  # [G, P]
        self.y = y[:, :, None, :]  # [G, P, 1, n]
        absent = not bool(present.all())
        self.off = torch.where(present, 0.0, _NEG).to(xt.dtype)[..., None] if absent else None  # [G, P, K, 1]
        self.k = present.shape[2]
        self.minv = self.diag = None
        if spectrum is not None:  # x in its covariance's eigenbasis: (Σ/K + λ)⁻¹ is diagonal, per problem
            self.diag = 1.0 / (spectrum.to(xt.dtype)[:, None, :] / self.k + self.lam[..., None])  # [G, P, d]
        else:
            if cov is None:
                # rows for a decent estimate grow with d: 6·d of them (sampling is cheaper than passes)
                cov = covariance(xt.mT, (w > 0).any(1), max_rows=max(1024, 6 * xt.shape[1]))
            self.minv = _preconditioner(cov.to(xt.dtype), self.lam.mean(1), self.k)  # [G, d, d]

    def take(self, gi: Tensor, pi: Tensor) -> Objective:
        """The objective of problem slots ``pi`` ``[G', P']`` of groups ``gi`` ``[G']``."""
        out = object.__new__(Objective)
        out.k, out.xt, out.aug, out.groups = self.k, self.xt, self.aug, self.groups[gi]
        out.minv = None if self.minv is None else self.minv[gi]
        for name in ("w", "lam", "y", "off", "diag"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t[gi[:, None], pi])
        return out

    def precondition(self, v: Tensor) -> Tensor:
        """``v`` ``[G, P, K, d+1]`` times the inverse of a bound on the Hessian at zero:
        ``(Σ/K + λ)⁻¹`` on the weights, ``K`` on the intercept."""
        ng, p, k, d1 = v.shape
        out = torch.empty_like(v)
        if self.diag is not None:
            torch.mul(v[..., :-1], self.diag[:, :, None, :], out=out[..., :-1])
        else:
            torch.bmm(v.view(ng, p * k, d1)[..., :-1], self.minv, out=out.view(ng, p * k, d1)[..., :-1])
        torch.mul(v[..., -1], self.k, out=out[..., -1])
        return out

    def _product(self, a: Tensor, transpose: bool, out: Tensor, live: Tensor | None) -> Tensor | None:
        """``out[g, p] = a[g, p] @ xᵀ`` (``transpose``) or ``a[g, p] @ x`` (``a``, ``out`` ``[G, P, K, ·]``)
        for every slot, or with ``live`` ``[G, P]`` for the slots of each group from its first live one
        to its last (no copies; finished problems between them cost a little). Returns the slots
        written then (``None``: all). ``x`` is read in place, never copied."""
        ng, p, k = a.shape[:3]
        if live is None and len(self.groups) == len(self.xt):
            x = self.xt if transpose else self.xt.mT
            torch.bmm(a.reshape(ng, p * k, -1), x, out=out.view(ng, p * k, -1))
            return None
        flags = [[True] * p] * ng if live is None else live.tolist()
        written = torch.zeros(ng, p, dtype=torch.bool)
        for i, g in enumerate(self.groups.tolist()):
            if not any(flags[i]):  # a group whose problems are all finished costs nothing
                continue
            lo, hi = flags[i].index(True), p - flags[i][::-1].index(True)
            x = self.xt[g] if transpose else self.xt[g].T
            torch.mm(a[i, lo:hi].reshape((hi - lo) * k, -1), x, out=out[i, lo:hi].view((hi - lo) * k, -1))
            written[i, lo:hi] = True
        return None if bool(written.all()) else written

    def linear(self, theta: Tensor, live: Tensor | None = None) -> Tensor:
        """``theta`` ``[G, P, K, d+1]`` (weights | intercept) → logits ``[G, P, K, n]`` (0 off ``live``)."""
        ng, p, k, _ = theta.shape
        new = theta.new_empty if live is None else theta.new_zeros
        out = new(ng, p, k, self.xt.shape[2])
        if self.aug:  # the intercepts multiply x's column of ones
            self._product(theta, True, out, live)
            return out
        self._product(theta[..., :-1], True, out, live)
        return out.add_(theta[..., -1:])

    def probs(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax ``[G, P, K, n]`` and data loss ``[G, P]`` at logits ``z``."""
        if self.off is not None:
            z = z + self.off
        prob = torch.softmax(z, dim=2)  # one fused pass; the loss needs only the labels' entries
        p_y = prob.gather(2, self.y).squeeze(2)
        if bool((p_y < 1e-30).any()):  # far off (a long trial step): -log p_y exactly, from the logits
            nll = torch.logsumexp(z, 2) - z.gather(2, self.y).squeeze(2)
        else:
            nll = p_y.log_().neg_()
        return prob, nll.mul_(self.w).sum(-1)

    def grad(
        self, theta: Tensor, prob: Tensor, old: Tensor | None = None, live: Tensor | None = None
    ) -> Tensor:
        """Gradient ``[G, P, K, d+1]`` of ``f`` at ``theta`` whose softmax is ``prob``; with ``live``
        ``[G, P]``, only where it may have changed (``old`` elsewhere)."""
        w = self.w[:, :, None, :]
        resid = (prob * w).scatter_add_(2, self.y, w.neg())  # w · (softmax - onehot)
        out = torch.empty_like(theta)
        if self.aug:  # x's column of ones gives the intercepts' gradient in the same product
            written = self._product(resid, False, out, live)
        else:
            written = self._product(resid, False, out[..., :-1], live)
            torch.sum(resid, -1, out=out[..., -1])
        out[..., :-1] += theta[..., :-1] * self.lam[..., None, None]
        return out if written is None else torch.where(written[..., None, None], out, old)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((2, 3))


def covariance(x: Tensor, rows: Tensor, max_rows: int = 1024) -> Tensor:
    """Feature covariance ``[G, d, d]`` (second moment; ``x`` is centred) over ``rows`` ``[G, n]`` bool,
    from a strided subsample of at most about ``max_rows`` rows (enough for a preconditioner)."""
    stride = max(1, x.shape[1] // max_rows)
    xs, rs = x[:, ::stride], rows[:, ::stride]
    count = rs.sum(-1).clamp_min(1).to(x.dtype)[:, None, None]
    if bool(rs.all()):
        return torch.bmm(xs.mT, xs) / count
    return torch.bmm(xs.mT * rs.to(x.dtype)[:, None, :], xs) / count


def _preconditioner(cov: Tensor, lam: Tensor, k: int) -> Tensor:
    """``(Σ/K + λ·I)⁻¹`` ``[G, d, d]``: the inverse of the multinomial Hessian at zero (uniform classes).

    Correlated features make plain L-BFGS crawl; in this metric it takes a few dozen steps at most.
    """
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    mats = cov / k + lam[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(mats)
    if bool((info > 0).any()):  # numerically singular: more ridge where needed
        chol = torch.where((info > 0)[:, None, None], torch.linalg.cholesky(mats + 1e-3 * eye), chol)
    return torch.cholesky_inverse(chol)


_PER_PROBLEM = ("theta", "z", "prob", "loss", "g", "gamma", "active", "stalled")


class _State:
    """L-BFGS state of the problems still being solved: ``slot[g, p]`` is the chunk's problem index
    held in slot ``p`` of group ``rows[g]``."""

    def __init__(self, f: Objective, theta: Tensor, z: Tensor) -> None:
        ng, p = theta.shape[:2]
        self.f = f
        self.rows = torch.arange(ng)
        self.slot = torch.arange(p).expand(ng, p)
        self.theta, self.z = theta, z
        self.prob, self.loss = f.probs(z)
        self.g = None  # computed once the starting point is settled
        self.hist: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, rho) of recent iterations
        self.gamma = theta.new_ones(ng, p)  # scale of the initial inverse Hessian, from the newest pair
        self.active = torch.ones(ng, p, dtype=torch.bool)
        self.stalled = torch.zeros(ng, p, dtype=torch.bool)

    def take(self, gi: Tensor, pi: Tensor) -> None:
        """Keep problem slots ``pi`` ``[G', P']`` of groups ``gi`` ``[G']``; drop the rest."""
        self.f = self.f.take(gi, pi)
        self.rows, self.slot = self.rows[gi], self.slot[gi[:, None], pi]
        for name in _PER_PROBLEM:
            setattr(self, name, getattr(self, name)[gi[:, None], pi])
        self.hist = [tuple(t[gi[:, None], pi] for t in h) for h in self.hist]

    def remember(self, s: Tensor, yv: Tensor, m: int) -> None:
        """Add the curvature pair ``(s, y)`` ``[G, P, K, d+1]`` where it is one (``sᵀy > 0``)."""
        sy = _dot(s, yv)
        ok = sy > 1e-10 * (_dot(yv, yv) * _dot(s, s)).sqrt()
        ymy = _dot(yv, self.f.precondition(yv))
        self.gamma = torch.where(ok, sy / ymy.clamp_min(1e-30), self.gamma)
        self.hist.append(
            (s * ok[..., None, None], yv * ok[..., None, None], torch.where(ok, sy.reciprocal(), 0.0))
        )
        if len(self.hist) > m:
            self.hist.pop(0)


def _direction(st: _State, absent: Tensor) -> tuple[Tensor, Tensor]:
    """Preconditioned L-BFGS two-loop recursion, batched: every problem has its own history scalars."""
    g = st.g
    q = g.clone()
    coefs = []
    for s, yv, rho in reversed(st.hist):
        a = rho * _dot(s, q)
        q -= a[..., None, None] * yv
        coefs.append(a)
    q = st.f.precondition(q).mul_(st.gamma[..., None, None])
    for (s, yv, rho), a in zip(st.hist, reversed(coefs)):
        q += (a - rho * _dot(yv, q))[..., None, None] * s
    direction = q.neg_()
    direction[absent] = 0.0
    slope = _dot(g, direction)
    uphill = slope >= 0  # restart from steepest descent where the history misleads
    if bool(uphill.any()):
        direction = torch.where(uphill[..., None, None], -g, direction)
        slope = _dot(g, direction)
    direction *= st.active[..., None, None]
    return direction, slope


def lbfgs(
    f: Objective,
    present: Tensor,
    start: tuple[Tensor, Tensor | None] | None,
    along: tuple[Tensor, Tensor | None] | None,
    max_iter: int,
    tol: float,
    m: int,
    keep_state: bool,
) -> tuple:
    """Solve one chunk from ``start`` (``(theta [G, P, K, d+1], its logits, its curvature pairs)``, the
    last two possibly None; zero when None), first moved to the best point of the line through
    ``along`` and ``start`` (a path's previous two solutions) when given. Returns ``theta``, ``n_iter``
    and ``converged`` ``[G, P]``, and with ``keep_state`` the logits ``[G, P, K, n]`` at the solution
    and the last curvature pairs ``(s, y)`` ``[m, G, P, K, d+1]`` (``y`` without the penalty's part)."""
    ng, p, k = present.shape
    n, d1 = f.xt.shape[2], f.xt.shape[1] + (not f.aug)  # weights and intercept
    if start is None:
        theta, z = f.xt.new_zeros(ng, p, k, d1), f.xt.new_zeros(ng, p, k, n)  # no pass over x at zero
    else:
        theta, z = start[0].clone(), start[1]
        if z is None:
            z = f.linear(theta)
    st = _State(f, theta, z)
    if start is not None and start[2] is not None:  # the memory of a fit at another C: same data part
        for s, y_data in zip(*start[2]):
            yv = y_data.clone()
            yv[..., :-1] += f.lam[..., None, None] * s[..., :-1]
            st.remember(s, yv, m)
    absent = ~present
    if along is not None and start is not None:
        # extrapolate the path: a line search along start - along, in logit space
        direction = theta - along[0]
        direction[absent] = 0.0
        zd = z - along[1] if along[1] is not None else f.linear(direction)
        resid = (st.prob * zd).sum(2) - zd.gather(2, f.y).squeeze(2)
        slope = resid.mul_(f.w).sum(-1) + f.lam * _dot(theta[..., :-1], direction[..., :-1])
        alpha, _ = _line_search(st, direction, zd, slope)
        st.theta = theta + alpha[..., None, None] * direction
    st.g = f.grad(st.theta, st.prob)
    out_theta = st.theta.clone()
    out_z = st.z.clone() if keep_state else None
    kept = m  # the whole memory: fewer pairs cost the next fit on a path more iterations
    out_pairs = st.theta.new_zeros(2, kept, *st.theta.shape) if keep_state else None
    out_iter = torch.zeros(ng, p, dtype=torch.long)
    out_ok = torch.zeros(ng, p, dtype=torch.bool)

    def retire(done: Tensor) -> None:  # done: [G', P'] bool over the current slots
        gi, pi = done.nonzero(as_tuple=True)
        rows, slots = st.rows[gi], st.slot[gi, pi]
        out_theta[rows, slots] = st.theta[gi, pi]
        if out_z is not None:
            out_z[rows, slots] = st.z[gi, pi]
            recent = st.hist[-kept:]
            if recent:  # the newest pairs, y without the penalty's part
                s_kept = torch.stack([h[0][gi, pi] for h in recent])  # [L, R, K, d+1]
                y_kept = torch.stack([h[1][gi, pi] for h in recent])
                y_kept[..., :-1] -= st.f.lam[gi, pi][:, None, None] * s_kept[..., :-1]
                out_pairs[:, kept - len(recent) :, rows, slots] = torch.stack([s_kept, y_kept])
        out_ok[rows, slots] = (st.g[gi, pi].abs().amax((1, 2)) <= tol) | st.stalled[gi, pi]

    ftol = 4 * torch.finfo(f.xt.dtype).eps  # no relative progress left at this precision: stop
    for _ in range(max_iter):
        st.active &= (st.g.abs().amax((2, 3)) > tol) & ~st.stalled
        n_active = st.active.sum(1)  # [G']
        if not bool(n_active.any()):
            break
        width = int(n_active.max())
        if int((n_active > 0).sum()) * width < 0.5 * st.active.numel():
            # compact: keep groups with work left and, in each, its active problems first
            retire(~st.active)
            gi = (n_active > 0).nonzero().flatten()
            pi = torch.argsort((~st.active[gi]).to(torch.int8), dim=1, stable=True)[:, :width]
            st.take(gi, pi)
        live = None if bool(st.active.all()) else st.active  # passes over x skip finished problems
        out_iter[st.rows[:, None], st.slot] += st.active
        direction, slope = _direction(st, absent[st.rows[:, None], st.slot])
        zd = st.f.linear(direction, live)
        alpha, gain = _line_search(st, direction, zd, slope)
        st.stalled |= st.active & (gain <= ftol)
        step = alpha[..., None, None] * direction
        st.theta = st.theta + step
        g_new = st.f.grad(st.theta, st.prob, st.g, live)
        yv = g_new - st.g
        st.g = g_new
        st.remember(step, yv, m)
    retire(torch.ones_like(st.active))
    return out_theta, out_iter, out_ok, out_z, out_pairs


def _line_search(st: _State, direction: Tensor, zd: Tensor, slope: Tensor, tries: int = 4) -> tuple:
    """One Newton step on ``φ(α) = f(θ + α·direction)`` from ``α = 0``, in logit space (no pass over
    ``x``), shortened (÷4) where it does not decrease ``f``; updates the logits, softmax and data loss.

    Returns the step ``α`` ``[G, P]`` (0 where nothing decreased ``f``) and the relative decrease.
    """
    f = st.f
    coef, d_coef = st.theta[..., :-1], direction[..., :-1]
    ww, wd, dd = _dot(coef, coef), _dot(coef, d_coef), _dot(d_coef, d_coef)
    t = st.prob * zd
    pz = t.sum(2)  # [G, P, n]
    pzz = t.mul_(zd).sum(2)
    curv = (pzz - pz * pz).mul_(f.w).sum(-1) + f.lam * dd  # φ''(0)
    alpha = (-slope / curv.clamp_min(1e-20)).clamp(0.0, 1e6)
    start = st.loss + 0.5 * f.lam * ww
    for _ in range(tries):
        z = torch.addcmul(st.z, zd, alpha[..., None, None])
        prob, data = f.probs(z)
        val = data + 0.5 * f.lam * (ww + 2 * alpha * wd + alpha * alpha * dd)
        worse = val > start
        if not bool(worse.any()):
            break
        alpha = torch.where(worse, alpha / 4, alpha)
    if bool(worse.any()):  # no decrease along the direction at this precision: keep the point
        alpha = torch.where(worse, 0.0, alpha)
        keep = worse[..., None, None]
        z, prob = torch.where(keep, st.z, z), torch.where(keep, st.prob, prob)
        data, val = torch.where(worse, st.loss, data), torch.where(worse, start, val)
    st.z, st.prob, st.loss = z, prob, data
    return alpha, (start - val) / start.abs().clamp_min(1.0)
