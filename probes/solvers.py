"""Batched linear-probe solvers: many multinomial logistic regressions, or ridge fits, at once.

Every solver works on a stack of *groups* (one per hook point × role selection), each with its
own design matrix ``x[g]`` ``[n, d]``, and on several problems per group that share that matrix:
``F`` training sets (cross-validation folds as 0/1 sample weights, the full training split, the
shuffled-label control — each with its own labels and weights) times ``A`` regularisation
strengths. Sharing ``x`` is what makes batching pay: the logits of all problems of a group are one
matrix product ``[F·A·K, d] @ [d, n]``.

Logistic objective, per problem (the minimiser of scikit-learn's ``LogisticRegression(C=C)``: L2
penalty, unpenalised intercept, full multinomial loss)::

    f(W, b) = 1/S · Σ_i w_i · CE(softmax(W x_i + b), y_i)  +  1/(2·C·S) · ||W||²,   S = Σ_i w_i

scikit-learn minimises ``C·S·f``, which has the same minimiser. The solver is full-batch L-BFGS,
batched over groups and problems (every problem keeps its own history, step and stopping state):

- preconditioned by ``(Σ/K + λ·I)⁻¹``, the inverse Hessian at zero for uniform classes (``Σ`` the
  features' covariance): correlated features, the rule in residual streams, then cost a few dozen
  iterations instead of hundreds;
- with a Newton line search done in logit space: the logits along a direction ``D`` are
  ``Z + α·(D xᵀ)``, so choosing ``α`` costs no pass over ``x``;
- a problem stops when its largest gradient entry is at most ``tol`` (scikit-learn's ``gtol`` on the
  same scaled objective) or when the objective stops decreasing at the working precision; solved
  problems leave the batch (the remaining ones are packed), so stragglers do not cost the rest.

Ridge: one-hot targets, ``min Σ_i w_i ||onehot(y_i) - W x_i - b||² + alpha·||W||²`` in closed form
(normal equations, or the kernel form when ``d > n``) for every alpha of a training set at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_NEG = -1e30  # logit offset of a class absent from a problem's training set


@dataclass
class LinearFit:
    """Fitted weights of a batch of linear classifiers, ``F`` training sets × ``A`` strengths per group.

    Attributes:
        weight: ``[G, F, A, K, d]``; logits are ``x @ weight.mT + bias``.
        bias: ``[G, F, A, K]``.
        n_iter: ``[G, F, A]`` iterations used (0 for closed-form fits).
        converged: ``[G, F, A]`` bool.
    """

    weight: Tensor
    bias: Tensor
    n_iter: Tensor
    converged: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``x`` ``[G, n, d]`` → logits ``[G, F, A, K, n]``."""
        ng, nf, na, k, d = self.weight.shape
        z = torch.bmm(self.weight.reshape(ng, nf * na * k, d), x.mT.to(self.weight.dtype))
        return z.view(ng, nf, na, k, -1) + self.bias[..., None]


def _sets(t: Tensor, ng: int, n: int) -> Tensor:
    """``[G, n]`` or ``[G, F, n]`` → ``[G, F, n]``."""
    if t.dim() == 2:
        t = t[:, None, :]
    if t.dim() != 3 or t.shape[0] != ng or t.shape[2] != n:
        raise ValueError(
            f"expected labels/weights of shape [G={ng}, F, n={n}] or [G, n], got {tuple(t.shape)}"
        )
    return t


def _strengths(reg: Tensor | float, ng: int, nf: int, dtype: torch.dtype) -> Tensor:
    """A scalar, ``[A]``, ``[G, A]`` or ``[G, F, A]`` → ``[G, F, A]``."""
    reg = torch.as_tensor(reg, dtype=dtype)
    if reg.dim() == 0:
        reg = reg[None]
    if reg.dim() == 1:
        reg = reg[None]
    if reg.dim() == 2:
        reg = reg[:, None]
    if bool((reg <= 0).any()):
        raise ValueError(f"regularisation strengths must be positive, got {reg.unique().tolist()}")
    return reg.expand(ng, nf, reg.shape[-1])


def _chunks(ng: int, per_group: int, budget: int) -> list[slice]:
    step = max(1, budget // max(per_group, 1))
    return [slice(i, min(i + step, ng)) for i in range(0, ng, step)]


def class_counts(y: Tensor, weight: Tensor, n_classes: int) -> Tensor:
    """Weighted class counts ``[..., K]`` of labels / weights ``[..., n]``."""
    out = torch.zeros(*y.shape[:-1], n_classes, dtype=weight.dtype)
    return out.scatter_add_(-1, y, weight)


def fit_logistic(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    c: Tensor | float,
    n_classes: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    history: int = 10,
    init: LinearFit | tuple[Tensor, Tensor] | None = None,
    cov: Tensor | None = None,
    budget: int = 1 << 24,
) -> LinearFit:
    """Fit ``G × F × A`` L2-regularised multinomial logistic regressions at once.

    Args:
        x: ``[G, n, d]`` features (standardise them first; padding rows need weight 0).
        y: ``[G, n]`` or ``[G, F, n]`` int64 class indices in ``0..K-1``.
        weight: ``[G, n]`` or ``[G, F, n]`` non-negative sample weights; 0 leaves a row out.
        c: scikit-learn's ``C`` (inverse strength): a scalar, ``[A]``, ``[G, A]`` or ``[G, F, A]``.
        n_classes: ``K``. A problem predicts only the classes present (weight > 0) in its rows.
        max_iter, tol, history: L-BFGS iterations, gradient tolerance, memory.
        init: a warm start, a fit or ``(weight [G, F, A, K, d], bias [G, F, A, K])`` (e.g. at a nearby ``C``).
        cov: ``[G, d, d]`` feature covariance for the preconditioner (:func:`covariance`), to reuse
            across calls on the same ``x``; computed when omitted.
        budget: elements of one ``[g, F·A, K, n]`` work tensor; groups are solved in chunks under it.

    Returns:
        :class:`LinearFit`: ``weight`` ``[G, F, A, K, d]``, ``bias`` ``[G, F, A, K]``.
    """
    ng, n, d = x.shape
    y, weight = _sets(y, ng, n), _sets(weight.to(x.dtype), ng, n)
    nf = max(y.shape[1], weight.shape[1])
    y, weight = y.expand(ng, nf, n), weight.expand(ng, nf, n)
    c = _strengths(c, ng, nf, x.dtype)
    na, k = c.shape[-1], n_classes
    present = class_counts(y, weight, k) > 0  # [G, F, K]

    def flat(t: Tensor) -> Tensor:  # [G, F, ...] → [G, F·A, ...]
        return t[:, :, None].expand(ng, nf, na, *t.shape[2:]).reshape(ng, nf * na, *t.shape[2:])

    y_p, w_p, present_p, c_p = flat(y), flat(weight), flat(present), c.reshape(ng, nf * na)
    theta0 = None
    if init is not None:
        w0, b0 = (init.weight, init.bias) if isinstance(init, LinearFit) else init
        theta0 = torch.cat([w0, b0[..., None]], -1).to(x.dtype).reshape(ng, nf * na, k, d + 1)
    parts = []
    for s in _chunks(ng, nf * na * k * n, budget):
        start = None if theta0 is None else theta0[s]
        cov_s = None if cov is None else cov[s]
        parts.append(_lbfgs(x[s], y_p[s], w_p[s], c_p[s], present_p[s], start, cov_s, max_iter, tol, history))
    theta, n_iter, ok = (torch.cat([p[i] for p in parts]) for i in range(3))
    theta = theta.view(ng, nf, na, k, d + 1)
    return LinearFit(
        theta[..., :-1].contiguous(),
        theta[..., -1].contiguous(),
        n_iter.view(ng, nf, na),
        ok.view(ng, nf, na),
    )


class _Objective:
    """The logistic objective of one chunk: ``P`` problem slots per group sharing ``x``."""

    def __init__(
        self, x: Tensor, y: Tensor, w: Tensor, c: Tensor, present: Tensor, cov: Tensor | None
    ) -> None:
        total = w.sum(-1).clamp_min(1e-12)  # [G, P]
        self.x = x
        self.w = w / total[..., None]  # [G, P, n], each problem's weights sum to 1
        self.lam = 1.0 / (c * total)  # [G, P]
        self.y = y[:, :, None, :]  # [G, P, 1, n]
        self.off = torch.where(present, 0.0, _NEG).to(x.dtype)[..., None]  # [G, P, K, 1]
        self.k = present.shape[2]
        if cov is None:
            cov = covariance(x, (w > 0).any(1))
        self.minv = _preconditioner(cov.to(x.dtype), self.lam.mean(1), self.k)  # [G, d, d]

    def take(self, gi: Tensor, pi: Tensor) -> _Objective:
        """The objective of problem slots ``pi`` ``[G', P']`` of groups ``gi`` ``[G']``."""
        out = object.__new__(_Objective)
        out.k, out.x, out.minv = self.k, self.x[gi], self.minv[gi]
        for name in ("w", "lam", "y", "off"):
            setattr(out, name, getattr(self, name)[gi[:, None], pi])
        return out

    def precondition(self, v: Tensor) -> Tensor:
        """``v`` ``[G, P, K, d+1]`` times the inverse of a bound on the Hessian at zero:
        ``(Σ/K + λ)⁻¹`` on the weights, ``K`` on the intercept."""
        ng, p, k, d1 = v.shape
        coef = torch.bmm(v[..., :-1].reshape(ng, p * k, d1 - 1), self.minv).view(ng, p, k, d1 - 1)
        return torch.cat([coef, v[..., -1:] * self.k], dim=-1)

    def linear(self, theta: Tensor) -> Tensor:
        """``theta`` ``[G, P, K, d+1]`` (weights | intercept) → logits ``[G, P, K, n]``."""
        ng, p, k, _ = theta.shape
        coef = theta[..., :-1].reshape(ng, p * k, -1)
        z = torch.bmm(self.x, coef.mT)  # [G, n, P·K]: the fast layout for a thin product
        return z.mT.reshape(ng, p, k, -1) + theta[..., -1:]

    def probs(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax ``[G, P, K, n]`` and data loss ``[G, P]`` at logits ``z``."""
        logp = torch.log_softmax(z + self.off, dim=2)
        loss = -logp.gather(2, self.y).squeeze(2).mul(self.w).sum(-1)
        return logp.exp(), loss

    def grad(self, theta: Tensor, prob: Tensor) -> Tensor:
        """Gradient ``[G, P, K, d+1]`` of ``f`` at ``theta`` whose softmax is ``prob``."""
        ng, p, k, n = prob.shape
        resid = prob.scatter_add(2, self.y, -torch.ones_like(self.y, dtype=prob.dtype))
        resid *= self.w[:, :, None, :]
        g_coef = torch.bmm(resid.view(ng, p * k, n), self.x).view(ng, p, k, -1)
        g_coef += self.lam[..., None, None] * theta[..., :-1]
        return torch.cat([g_coef, resid.sum(-1, keepdim=True)], dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((2, 3))


def covariance(x: Tensor, rows: Tensor, max_rows: int = 1024) -> Tensor:
    """Feature covariance ``[G, d, d]`` (second moment; ``x`` is centred) over ``rows`` ``[G, n]`` bool,
    from a strided subsample of at most about ``max_rows`` rows (enough for a preconditioner)."""
    stride = max(1, x.shape[1] // max_rows)
    xs, rs = x[:, ::stride], rows[:, ::stride].to(x.dtype)
    return torch.bmm(xs.mT * rs[:, None, :], xs) / rs.sum(-1).clamp_min(1)[:, None, None]


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


_PER_PROBLEM = ("theta", "z", "prob", "loss", "g", "active", "stalled")


class _State:
    """L-BFGS state of the problems still being solved: ``slot[g, p]`` is the chunk's problem index
    held in slot ``p`` of group ``rows[g]``."""

    def __init__(self, f: _Objective, theta: Tensor) -> None:
        ng, p = theta.shape[:2]
        self.f = f
        self.rows = torch.arange(ng)
        self.slot = torch.arange(p).expand(ng, p)
        self.theta = theta
        self.z = f.linear(theta)
        self.prob, self.loss = f.probs(self.z)
        self.g = f.grad(theta, self.prob)
        self.hist: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, rho) of recent iterations
        self.active = torch.ones(ng, p, dtype=torch.bool)
        self.stalled = torch.zeros(ng, p, dtype=torch.bool)

    def take(self, gi: Tensor, pi: Tensor) -> None:
        """Keep problem slots ``pi`` ``[G', P']`` of groups ``gi`` ``[G']``; drop the rest."""
        self.f = self.f.take(gi, pi)
        self.rows, self.slot = self.rows[gi], self.slot[gi[:, None], pi]
        for name in _PER_PROBLEM:
            setattr(self, name, getattr(self, name)[gi[:, None], pi])
        self.hist = [tuple(t[gi[:, None], pi] for t in h) for h in self.hist]


def _direction(st: _State, absent: Tensor) -> tuple[Tensor, Tensor]:
    """Preconditioned L-BFGS two-loop recursion, batched: every problem has its own history scalars."""
    g = st.g
    q = g.clone()
    coefs = []
    for s, yv, rho in reversed(st.hist):
        a = rho * _dot(s, q)
        q -= a[..., None, None] * yv
        coefs.append(a)
    q = st.f.precondition(q)
    if st.hist:
        s, yv, _ = st.hist[-1]
        q *= (_dot(s, yv) / _dot(yv, st.f.precondition(yv)).clamp_min(1e-30))[..., None, None]
    for (s, yv, rho), a in zip(st.hist, reversed(coefs)):
        q += (a - rho * _dot(yv, q))[..., None, None] * s
    direction = -q
    direction[absent] = 0.0
    slope = _dot(g, direction)
    uphill = slope >= 0  # restart from steepest descent where the history misleads
    if bool(uphill.any()):
        direction = torch.where(uphill[..., None, None], -g, direction)
        slope = _dot(g, direction)
    direction *= st.active[..., None, None]
    return direction, slope


def _lbfgs(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    c: Tensor,
    present: Tensor,
    init: Tensor | None,
    cov: Tensor | None,
    max_iter: int,
    tol: float,
    m: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve one chunk. Returns ``theta`` ``[G, P, K, d+1]``, ``n_iter`` and ``converged`` ``[G, P]``."""
    ng, p, k = present.shape
    theta0 = torch.zeros(ng, p, k, x.shape[-1] + 1, dtype=x.dtype) if init is None else init.clone()
    out_theta = theta0.clone()
    out_iter = torch.zeros(ng, p, dtype=torch.long)
    out_ok = torch.zeros(ng, p, dtype=torch.bool)
    st = _State(_Objective(x, y, w, c, present, cov), theta0)

    def retire(done: Tensor) -> None:  # done: [G', P'] bool over the current slots
        gi, pi = done.nonzero(as_tuple=True)
        rows, slots = st.rows[gi], st.slot[gi, pi]
        out_theta[rows, slots] = st.theta[gi, pi]
        out_ok[rows, slots] = (st.g[gi, pi].abs().amax((1, 2)) <= tol) | st.stalled[gi, pi]

    ftol = 4 * torch.finfo(x.dtype).eps  # no relative progress left at this precision: stop
    for _ in range(max_iter):
        st.active &= (st.g.abs().amax((2, 3)) > tol) & ~st.stalled
        n_active = st.active.sum(1)  # [G']
        if not bool(n_active.any()):
            break
        width = int(n_active.max())
        if int((n_active > 0).sum()) * width < 0.6 * st.active.numel():
            # compact: keep groups with work left and, in each, its active problems first
            retire(~st.active)
            gi = (n_active > 0).nonzero().flatten()
            pi = torch.argsort((~st.active[gi]).to(torch.int8), dim=1, stable=True)[:, :width]
            st.take(gi, pi)
        out_iter[st.rows[:, None], st.slot] += st.active
        direction, slope = _direction(st, ~present[st.rows[:, None], st.slot])
        zd = st.f.linear(direction)
        alpha, st.prob, st.loss, gain = _line_search(st, direction, zd, slope)
        st.stalled |= st.active & (gain <= ftol)
        alpha *= st.active
        step = alpha[..., None, None] * direction
        st.theta = st.theta + step
        st.z = st.z + alpha[..., None, None] * zd
        g_new = st.f.grad(st.theta, st.prob)
        yv = g_new - st.g
        st.g = g_new
        sy = _dot(step, yv)
        ok = sy > 1e-10 * (_dot(yv, yv) * _dot(step, step)).sqrt()
        st.hist.append((step * ok[..., None, None], yv * ok[..., None, None], torch.where(ok, 1 / sy, 0.0)))
        if len(st.hist) > m:
            st.hist.pop(0)
    retire(torch.ones_like(st.active))
    return out_theta, out_iter, out_ok


def _line_search(st: _State, direction: Tensor, zd: Tensor, slope: Tensor, steps: int = 1) -> tuple:
    """Line search by Newton steps on ``φ(α) = f(θ + α·direction)`` from ``α = 0``, in logit space.

    Returns the best step ``α`` ``[G, P]`` seen, the softmax and data loss there, and the relative
    decrease of the objective ``[G, P]``.
    """
    f = st.f
    coef, d_coef = st.theta[..., :-1], direction[..., :-1]
    ww, wd, dd = _dot(coef, coef), _dot(coef, d_coef), _dot(d_coef, d_coef)
    zy = zd.gather(2, f.y).squeeze(2)  # [G, P, n]
    alpha = torch.zeros_like(slope)
    best, best_prob, best_loss = alpha, st.prob, st.loss
    start = st.loss + 0.5 * f.lam * ww
    best_val = start
    p = st.prob
    for i in range(steps):
        pz = (p * zd).sum(2)  # [G, P, n]
        pzz = (p * zd * zd).sum(2)
        dphi = slope if i == 0 else (pz - zy).mul(f.w).sum(-1) + f.lam * (wd + alpha * dd)
        curv = (pzz - pz * pz).mul(f.w).sum(-1) + f.lam * dd
        alpha = (alpha - dphi / curv.clamp_min(1e-20)).clamp(0.0, 1e6)
        p, data = f.probs(st.z + alpha[..., None, None] * zd)
        val = data + 0.5 * f.lam * (ww + 2 * alpha * wd + alpha * alpha * dd)
        better = val <= best_val
        best = torch.where(better, alpha, best)
        best_val = torch.where(better, val, best_val)
        best_loss = torch.where(better, data, best_loss)
        best_prob = torch.where(better[..., None, None], p, best_prob)
    return best, best_prob, best_loss, (start - best_val) / start.abs().clamp_min(1.0)


def fit_ridge(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    alpha: Tensor | float,
    n_classes: int,
    *,
    budget: int = 1 << 25,
) -> LinearFit:
    """Closed-form ridge regression on one-hot targets for ``G × F × A`` problems (float64 inside).

    Minimises ``Σ_i w_i ||onehot(y_i) - W x_i - b||² + alpha·||W||²`` with the intercept unpenalised,
    through the ``d × d`` normal equations, or the ``n × n`` kernel form when ``d > n``.

    Args:
        x: ``[G, n, d]``; y: ``[G, n]`` or ``[G, F, n]`` class indices; weight: ``[G, n]`` or ``[G, F, n]``.
        alpha: penalties: a scalar, ``[A]``, ``[G, A]`` or ``[G, F, A]`` (tables report ``C = 1/alpha``).

    Returns:
        :class:`LinearFit` (``weight`` ``[G, F, A, K, d]``, ``bias`` ``[G, F, A, K]``) in ``x``'s dtype.
    """
    ng, n, d = x.shape
    y, weight = _sets(y, ng, n), _sets(weight, ng, n)
    nf = max(y.shape[1], weight.shape[1])
    y, weight = y.expand(ng, nf, n), weight.expand(ng, nf, n)
    alpha = _strengths(alpha, ng, nf, torch.float64)
    na = alpha.shape[-1]
    coefs, biases = [], []
    for s in _chunks(ng, n * d, budget):
        x64 = x[s].double()
        per_set = [_ridge_one(x64, y[s, f], weight[s, f].double(), alpha[s, f], n_classes) for f in range(nf)]
        coefs.append(torch.stack([c for c, _ in per_set], 1))
        biases.append(torch.stack([b for _, b in per_set], 1))
    return LinearFit(
        torch.cat(coefs).to(x.dtype),
        torch.cat(biases).to(x.dtype),
        torch.zeros(ng, nf, na, dtype=torch.long),
        torch.ones(ng, nf, na, dtype=torch.bool),
    )


def _ridge_one(x: Tensor, y: Tensor, w: Tensor, alpha: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """One training set per group: ``x`` ``[g, n, d]``, ``y``/``w`` ``[g, n]``, ``alpha`` ``[g, A]``.

    Returns ``weight`` ``[g, A, K, d]`` and ``bias`` ``[g, A, K]``.
    """
    g, n, d = x.shape
    na = alpha.shape[1]
    onehot = torch.zeros(g, n, k, dtype=x.dtype).scatter_(2, y[..., None], 1.0)
    total = w.sum(-1, keepdim=True).clamp_min(1e-12)  # [g, 1]
    mu_x = torch.einsum("gn,gnd->gd", w, x) / total
    mu_y = torch.einsum("gn,gnk->gk", w, onehot) / total
    sqw = w.sqrt()[..., None]
    xs = (x - mu_x[:, None]) * sqw  # centred rows scaled by sqrt(w): [g, n, d]
    ys = (onehot - mu_y[:, None]) * sqw  # [g, n, K]
    reg = alpha[..., None, None]  # [g, A, 1, 1]
    if d <= n:
        gram = (xs.mT @ xs)[:, None] + reg * torch.eye(d, dtype=x.dtype)  # [g, A, d, d]
        coef = torch.linalg.solve(gram, (xs.mT @ ys)[:, None].expand(g, na, d, k))
    else:
        kern = (xs @ xs.mT)[:, None] + reg * torch.eye(n, dtype=x.dtype)  # [g, A, n, n]
        coef = xs.mT[:, None] @ torch.linalg.solve(kern, ys[:, None].expand(g, na, n, k))
    bias = mu_y[:, None] - torch.einsum("gd,gadk->gak", mu_x, coef)
    return coef.mT.contiguous(), bias
