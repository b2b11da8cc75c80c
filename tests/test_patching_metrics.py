"""Patching metrics compute what they say on hand-made logits; normalisation reports both baselines
and refuses a zero scale (NaN, never inf); results serialise to JSON and draw a heatmap."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from uniprobe.probes.patching import (
    GridLogProb,
    JudgeRate,
    KLToClean,
    LogitDiff,
    PatchResult,
    SequenceLogProb,
    TargetProb,
    correlation,
    grid_sites,
    heatmap,
    logits_of,
    normalise,
    shifted,
)


def _logits(seed: int = 0, n: int = 3, pos: int = 4, vocab: int = 6) -> torch.Tensor:
    return torch.randn(n, pos, vocab, generator=torch.Generator().manual_seed(seed))


def test_logit_diff_and_probabilities() -> None:
    lg = _logits()
    out = SimpleNamespace(logits=lg)
    assert torch.equal(LogitDiff(2, 4)(out), lg[:, -1, 2] - lg[:, -1, 4])
    assert torch.equal(LogitDiff(2, 4, position=1)(out), lg[:, 1, 2] - lg[:, 1, 4])
    p = lg[:, -1].softmax(-1)
    torch.testing.assert_close(TargetProb(3)(out), p[:, 3])
    torch.testing.assert_close(TargetProb(3, foil=1)(out), p[:, 3] - p[:, 1])
    assert LogitDiff(2, 4).last_position_only and not LogitDiff(2, 4, position=1).last_position_only
    assert not LogitDiff(2, 4, logits_fn=lambda o: o.logits).last_position_only  # unknown slicing: no


def test_logits_of_reads_common_outputs() -> None:
    lg = _logits()
    assert logits_of(lg) is lg
    assert logits_of((lg, None)) is lg
    assert logits_of(SimpleNamespace(text_logits=lg)) is lg
    with pytest.raises(TypeError, match="pass logits_fn"):
        logits_of({"nothing": 1})


def test_sequence_logprob_teacher_forced() -> None:
    lg = _logits(1, pos=6)
    tokens = [1, 4, 0]
    want = sum(lg[:, 2 + k].log_softmax(-1)[:, t] for k, t in enumerate(tokens))  # predicted from 2, 3, 4
    got = SequenceLogProb(tokens, shifted(3, 3))(SimpleNamespace(logits=lg))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="gave 2 positions for 3 target tokens"):
        SequenceLogProb(tokens, lambda out: out[:, :2])(lg)
    with pytest.raises(ValueError, match="≥ 1"):
        shifted(0, 2)


def test_grid_logprob_and_distribution() -> None:
    cells = _logits(2, n=2, pos=4, vocab=5)  # [n, cells, tiles]
    target = [0, 3, 3, 1]
    metric = GridLogProb(target, cell_logits_fn=lambda out: out)
    want = torch.stack([cells[:, c].log_softmax(-1)[:, t] for c, t in enumerate(target)], 1).mean(1)
    torch.testing.assert_close(metric(cells), want)
    dist = metric.distribution(cells)
    assert dist.shape == (2, 4, 5) and torch.allclose(dist.sum(-1), torch.ones(2, 4))


def test_kl_to_clean() -> None:
    clean = _logits(3, n=1)
    metric = KLToClean()
    with pytest.raises(RuntimeError, match="prepare"):
        metric(SimpleNamespace(logits=clean))
    metric.prepare(SimpleNamespace(logits=clean))
    assert float(metric(SimpleNamespace(logits=clean))) == pytest.approx(0.0, abs=1e-7)
    other = _logits(4, n=3)  # three patched rows of one example: each compared to the clean row
    p, q = clean[:, -1].softmax(-1), other[:, -1].softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(metric(SimpleNamespace(logits=other)), want, atol=1e-6, rtol=1e-5)


def test_judge_rate() -> None:
    tokens = torch.tensor([[1, 2], [3, 3], [1, 9]])
    assert torch.equal(JudgeRate(lambda t: int(t[0]) == 1)(tokens), torch.tensor([1.0, 0.0, 1.0]))


def test_normalise_and_result_json(tmp_path) -> None:
    v = torch.tensor([0.0, 1.0, 2.0, 4.0])
    assert torch.equal(normalise(v, clean=4.0, corrupted=0.0), torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.isnan(normalise(v, clean=1.0, corrupted=1.0)).all()
    grid = grid_sites(2, 2, ("resid_pre",), labels=["a", "b"])
    res = PatchResult(v, clean=4.0, corrupted=0.0, sites=grid.sites, grid=grid, metric="m")
    data = json.loads(json.dumps(res.to_json()))
    assert data["baselines"] == {"clean": 4.0, "corrupted": 0.0}
    assert data["axes"] == {"kind": ["resid_pre"], "layer": [0, 1], "column": ["a", "b"]}
    assert data["grid_normalised"] == [[[0.0, 0.25], [0.5, 1.0]]]
    flat = PatchResult(v, clean=1.0, corrupted=1.0, sites=grid.sites, grid=grid)
    assert json.loads(json.dumps(flat.to_json()))["normalised"] == [None] * 4  # NaN → null
    png = heatmap(res, tmp_path / "h.png", column_labels=["x", "y"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isclose(correlation(v, 2 * v + 1), 1.0)
    assert math.isnan(correlation(v, torch.ones(4)))
