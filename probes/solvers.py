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
from uniprobe.probes.lbfgs import Objective, covariance, lbfgs


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
        f = Objective(
            xt[s], y_p[s], w_p[s], c_p[s], present_p[s], cov_s, None if spectrum is None else spectrum[s]
        )
        parts.append(
            lbfgs(f, present_p[s], _rows(start, s), _rows(line, s), max_iter, tol, history, keep_state)
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
