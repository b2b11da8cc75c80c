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
  iterations instead of hundreds. When many fits share ``x`` (the probes' cross-validation),
  :func:`design` rotates it once onto ``Σ``'s eigenvectors (an orthogonal change of basis: the same
  objective, the weights map back exactly); there the preconditioner is diagonal, so each problem
  has its own ``λ`` and an iteration needs no ``d × d`` product;
- with a Newton line search done in logit space: the logits along a direction ``D`` are
  ``Z + α·(D xᵀ)``, so choosing ``α`` costs no pass over ``x``; an iteration costs two passes
  (``D xᵀ`` and the gradient's ``Rᵀ x``), which is where the time goes;
- along a path of ``C`` (strong to weak penalty) a fit starts at the best point of the line through
  the previous two solutions and with the previous fit's L-BFGS memory (its curvature pairs, the
  penalty's part corrected), both free when the previous fits kept their logits (``keep_state``);
- a problem stops when its largest gradient entry is at most ``tol`` (scikit-learn's ``gtol`` on the
  same scaled objective) or when the objective stops decreasing at the working precision; solved
  problems cost no more passes over ``x`` and leave the batch when enough have (the remaining ones
  are packed), so stragglers do not cost the rest; rows no problem weighs at the end of ``x`` (a test
  split) are never read.

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
        fitted_logits: ``[G, F, A, K, n']`` the logits of the fitted rows of ``x`` (its first ``n'``,
            up to the last row with a weight) when :func:`fit_logistic` was asked to keep its state.
        history: with them, the solver's last curvature pairs ``(s, y)``, each ``[m, G, F, A, K, d+1]``
            (``y`` without the penalty's part), which start the L-BFGS memory of a fit at a nearby ``C``.
    """

    weight: Tensor
    bias: Tensor
    n_iter: Tensor
    converged: Tensor
    fitted_logits: Tensor | None = None
    history: tuple[Tensor, Tensor] | None = None

    def logits(self, x: Tensor) -> Tensor:
        """``x`` ``[G, n, d]`` → logits ``[G, F, A, K, n]``."""
        ng, nf, na, k, d = self.weight.shape
        z = torch.bmm(self.weight.reshape(ng, nf * na * k, d), x.mT.to(self.weight.dtype))
        return z.view(ng, nf, na, k, -1).add_(self.bias[..., None])

    def predict(self, x: Tensor) -> Tensor:
        """``x`` ``[G, n, d]`` → predicted classes ``[G, F, A, n]`` (the first of tied logits)."""
        return argmax_classes(self.logits(x), 3)


def argmax_classes(z: Tensor, dim: int) -> Tensor:
    """``z.argmax(dim)`` for a short class dimension: ``max(dim)``'s indices (same ties: the first),
    an order of magnitude faster on CPU than ``argmax`` over a non-last dimension."""
    return z.max(dim).indices


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


@dataclass
class Design:
    """Features prepared once for many logistic fits on them (:func:`design`).

    Attributes:
        xt: ``[G, d+1, n]``: the features rotated onto the principal axes of their covariance, one row
            per feature (the faster layout for the solver's products), then a row of ones (so one
            product gives the logits with their intercepts, another the gradient with the intercepts').
        spectrum: ``[G, d]`` the covariance's eigenvalues (its diagonal in that basis).
        basis: ``[G, d, d]`` its eigenvectors (columns): rotated features are ``features @ basis``.
        scale: ``[G, d]`` with ``standardise``: the features' std, which they were divided by first.
    """

    xt: Tensor
    spectrum: Tensor
    basis: Tensor
    scale: Tensor | None = None

    @property
    def features(self) -> Tensor:
        """``[G, n, d]`` rotated features (a view)."""
        return self.xt[:, :-1].mT

    def unrotate(self, fit: LinearFit) -> LinearFit:
        """A fit on the rotated features → the same classifiers on the original ones."""
        ng, d = fit.weight.shape[0], fit.weight.shape[-1]
        weight = torch.bmm(fit.weight.reshape(ng, -1, d), self.basis.mT).view(fit.weight.shape)
        return LinearFit(weight, fit.bias, fit.n_iter, fit.converged)  # on x / scale


def design(x: Tensor, rows: Tensor, *, standardise: bool = False) -> Design:
    """Prepare ``x`` ``[G, n, d]`` (standardised) for many fits: rotate it onto the eigenvectors of its
    covariance over ``rows`` ``[G, n]`` bool and append a column of ones. With ``standardise``, ``x``
    need only be centred: its features are divided by their std over ``rows`` (read off the
    covariance, so no extra pass over ``x``; a feature without variance keeps scale 1), kept in
    ``Design.scale``.

    The rotation is orthogonal, so a fit on the rotated features minimises the same objective (the L2
    penalty is rotation-invariant) and maps back exactly (:meth:`Design.unrotate`). In that basis the
    solver's preconditioner ``(Σ/K + λ)⁻¹`` is diagonal: every problem gets its own ``λ`` at no cost,
    and an iteration needs no ``d × d`` product. Preparing costs two ``n × d × d`` products per group
    (covariance, rotation): worth it when many problems share ``x``, as in cross-validation.
    """
    ng, n, d = x.shape
    cov = covariance(x, rows, max_rows=n)  # float32 eigenvectors: orthogonal to ~1e-6 (fits' tol 1e-4)
    scale = None
    if standardise:
        std = cov.diagonal(0, 1, 2).sqrt()
        std = torch.where(std > 1e-6 * std.amax(-1, keepdim=True).clamp_min(1e-30), std, 1.0)
        cov = cov / (std[:, :, None] * std[:, None, :])
        scale = std.to(x.dtype)
    spectrum, basis = torch.linalg.eigh(cov)
    rotate = basis if scale is None else basis / scale[:, :, None]  # (x / std) @ basis
    xt = x.new_empty(ng, d + 1, n)
    torch.bmm(rotate.mT, x.mT, out=xt[:, :-1])
    xt[:, -1] = 1.0
    return Design(xt, spectrum.clamp_min(0).to(x.dtype), basis, scale)


def fit_logistic(
    x: Tensor | Design,
    y: Tensor,
    weight: Tensor,
    c: Tensor | float,
    n_classes: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    history: int = 10,
    init: LinearFit | tuple[Tensor, Tensor] | None = None,
    along: LinearFit | None = None,
    cov: Tensor | None = None,
    keep_state: bool = False,
    budget: int = 1 << 24,
) -> LinearFit:
    """Fit ``G × F × A`` L2-regularised multinomial logistic regressions at once.

    Args:
        x: ``[G, n, d]`` features (standardise them first; padding rows need weight 0), or a
            :class:`Design` of them (then ``init`` and the returned weights are in its rotated basis).
        y: ``[G, n]`` or ``[G, F, n]`` int64 class indices in ``0..K-1``.
        weight: ``[G, n]`` or ``[G, F, n]`` non-negative sample weights; 0 leaves a row out.
        c: scikit-learn's ``C`` (inverse strength): a scalar, ``[A]``, ``[G, A]`` or ``[G, F, A]``.
        n_classes: ``K``. A problem predicts only the classes present (weight > 0) in its rows.
        max_iter, tol, history: L-BFGS iterations, gradient tolerance, memory.
        init: a warm start, a fit or ``(weight [G, F, A, K, d], bias [G, F, A, K])`` (e.g. at a nearby
            ``C``). A fit made with ``keep_state`` also lends its logits on ``x`` and its L-BFGS
            memory (curvature pairs, corrected for the new ``C``): pass such fits only for the same
            ``x`` and weights.
        along: with ``init``, the solution before it on a path (the fit at the previous ``C``): the
            solver starts at the best point of the line through both (a line search in logit space;
            their ``fitted_logits`` make it free), which saves iterations along a path of ``C``.
        cov: ``[G, d, d]`` feature covariance for the preconditioner (:func:`covariance`), to reuse
            across calls on the same ``x``; computed when omitted (unused with a :class:`Design`).
        keep_state: return the logits of the fitted rows and the last curvature pairs
            (``fitted_logits``, ``history``), for fits started from this one.
        budget: elements of one ``[g, F·A, K, n]`` work tensor; groups are solved in chunks under it.

    Returns:
        :class:`LinearFit`: ``weight`` ``[G, F, A, K, d]``, ``bias`` ``[G, F, A, K]``.
    """
    spectrum = None
    if isinstance(x, Design):
        xt, spectrum = x.xt, x.spectrum
    else:
        xt = x.mT  # [G, d, n], a view: a transposed copy would cost more than its faster products save
    ng, n, d = xt.shape[0], xt.shape[2], xt.shape[1] - (spectrum is not None)
    y, weight = _sets(y, ng, n), _sets(weight.to(xt.dtype), ng, n)
    nf = max(y.shape[1], weight.shape[1])
    y, weight = y.expand(ng, nf, n), weight.expand(ng, nf, n)
    c = _strengths(c, ng, nf, xt.dtype)
    na, k = c.shape[-1], n_classes
    present = class_counts(y, weight, k) > 0  # [G, F, K]
    # rows no problem uses at the end (a test split, padding) cost passes over x for nothing
    used = (weight > 0).any(1).any(0).nonzero()
    n_used = int(used[-1]) + 1 if len(used) else 1
    xt, y, weight = xt[..., :n_used], y[..., :n_used], weight[..., :n_used]

    def flat(t: Tensor) -> Tensor:  # [G, F, ...] → [G, F·A, ...]
        return t[:, :, None].expand(ng, nf, na, *t.shape[2:]).reshape(ng, nf * na, *t.shape[2:])

    def point(fit: LinearFit | tuple[Tensor, Tensor] | None) -> tuple | None:
        """(theta, its logits or None, its curvature pairs or None), as ``[G, F·A, ...]``."""
        if fit is None:
            return None
        w0, b0 = (fit.weight, fit.bias) if isinstance(fit, LinearFit) else fit
        theta = torch.cat([w0, b0[..., None]], -1).to(xt.dtype).reshape(ng, nf * na, k, d + 1)
        z = fit.fitted_logits if isinstance(fit, LinearFit) else None
        if z is None or z.shape != (ng, nf, na, k, n_used):
            return theta, None, None
        z = z.to(xt.dtype).reshape(ng, nf * na, k, n_used)
        if fit.history is None:
            return theta, z, None
        return theta, z, tuple(t.to(xt.dtype).flatten(2, 3) for t in fit.history)

    y_p, w_p, present_p, c_p = flat(y), flat(weight), flat(present), c.reshape(ng, nf * na)
    start, line = point(init), point(along)
    parts = []
    for s in _chunks(ng, nf * na * k * n_used, budget):
        cov_s = None if cov is None or spectrum is not None else cov[s]
        f = _Objective(
            xt[s], y_p[s], w_p[s], c_p[s], present_p[s], cov_s, None if spectrum is None else spectrum[s]
        )
        parts.append(
            _lbfgs(f, present_p[s], _rows(start, s), _rows(line, s), max_iter, tol, history, keep_state)
        )
    theta, n_iter, ok = (torch.cat([p[i] for p in parts]) for i in range(3))
    theta = theta.view(ng, nf, na, k, d + 1)
    logits = pairs = None
    if keep_state:
        logits = torch.cat([p[3] for p in parts]).view(ng, nf, na, k, n_used)
        pairs = tuple(torch.cat([p[4][i] for p in parts], 1).unflatten(2, (nf, na)) for i in range(2))
    return LinearFit(
        theta[..., :-1].contiguous(),
        theta[..., -1].contiguous(),
        n_iter.view(ng, nf, na),
        ok.view(ng, nf, na),
        logits,
        pairs,
    )


def _rows(pt: tuple | None, s: slice) -> tuple | None:
    """A chunk ``s`` of the groups of a starting point (theta, logits, curvature pairs)."""
    if pt is None:
        return None
    theta, z, pairs = pt
    return theta[s], None if z is None else z[s], None if pairs is None else tuple(t[:, s] for t in pairs)


class _Objective:
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

    def take(self, gi: Tensor, pi: Tensor) -> _Objective:
        """The objective of problem slots ``pi`` ``[G', P']`` of groups ``gi`` ``[G']``."""
        out = object.__new__(_Objective)
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

    def __init__(self, f: _Objective, theta: Tensor, z: Tensor) -> None:
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


def _lbfgs(
    f: _Objective,
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
