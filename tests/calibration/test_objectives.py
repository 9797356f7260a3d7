"""The label-free output objective: its value, and probes whose squared gradients estimate its curvature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_dqa.calibration.objectives import fisher_probe, leaf_kinds, output_divergence, output_leaves


def test_leaves_keep_floating_tensors_with_their_paths():
    out = [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(2, dtype=torch.long), "scores": torch.zeros(2)}]
    assert [p for p, _ in output_leaves(out)] == ["[0]['boxes']", "[0]['scores']"]
    assert [p for p, _ in output_leaves(torch.zeros(3))] == ["output"]


def test_auto_takes_kl_for_classifier_logits_and_mse_for_everything_else():
    out = {"logits": torch.zeros(4, 10), "map": torch.zeros(4, 10, 8, 8), "value": torch.zeros(4, 1)}
    assert leaf_kinds(out) == {"['logits']": "kl", "['map']": "mse", "['value']": "mse"}
    assert set(leaf_kinds(out, "mse").values()) == {"mse"}
    with pytest.raises(ValueError, match="output_divergence to be one of"):
        leaf_kinds(out, "l1")  # type: ignore[arg-type]


def test_divergence_is_the_summed_kl_and_mse_and_zero_at_full_precision():
    g = torch.Generator().manual_seed(0)
    f = {"logits": torch.randn(5, 7, generator=g), "dense": torch.randn(5, 3, 4, 4, generator=g)}
    q = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in f.items()}
    assert output_divergence(f, f).item() == 0.0
    kl = sum(F.kl_div(q["logits"][i].log_softmax(0), f["logits"][i].log_softmax(0), log_target=True,
                      reduction="sum") for i in range(5))  # fmt: skip
    mse = (q["dense"] - f["dense"]).square().sum() / 48
    assert torch.allclose(output_divergence(f, q), kl + mse, rtol=1e-5)
    per_pixel = output_divergence(f["dense"], q["dense"], "kl")  # KL over axis 1, averaged over the 16 pixels
    rows = lambda t: t.movedim(1, -1).reshape(-1, 3)  # noqa: E731
    expected = F.kl_div(rows(q["dense"]).log_softmax(1), rows(f["dense"]).log_softmax(1), log_target=True,
                        reduction="sum") / 16  # fmt: skip
    assert torch.allclose(per_pixel, expected, rtol=1e-5)


def test_divergence_names_a_leaf_whose_shape_differs():
    f = [{"boxes": torch.zeros(3, 4)}]
    with pytest.raises(ValueError, match=r"\[0\]\['boxes'\] has shape \(3, 4\) in full precision and \(2, 4\)"):
        output_divergence(f, [{"boxes": torch.zeros(2, 4)}])
    with pytest.raises(ValueError, match="same structure"):
        output_divergence(f, [{"other": torch.zeros(3, 4)}])


def test_kl_needs_a_class_axis():
    with pytest.raises(ValueError, match="no class axis"):
        fisher_probe(torch.zeros(4, 1, requires_grad=True), "kl")


def test_output_without_floating_tensors_is_an_error_naming_the_alternatives():
    with pytest.raises(ValueError, match="objective='training_step'"):
        fisher_probe([{"labels": torch.zeros(2, dtype=torch.long)}])


def test_empty_leaves_give_a_zero_probe():
    probe = fisher_probe([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}])
    assert probe.item() == 0.0


def _squared_gradients(head: torch.Tensor, a: torch.Tensor, divergence: str, draws: int) -> torch.Tensor:
    """``(draws, N, D)`` squared gradients of the probe of ``a @ head.T`` w.r.t. ``a``, one independent draw per row.

    The probe sums per-sample terms, so ``draws`` copies of the ``N`` samples in one batch are ``draws`` draws.
    """
    x = a.repeat(draws, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(fisher_probe(x @ head.T, divergence, torch.Generator().manual_seed(1)), x)
    return grad.square().reshape(draws, *a.shape)


def test_kl_probe_squared_gradients_estimate_the_fisher_diagonal():
    # The Hessian of KL(p || softmax(z)) at z = logits is diag(p) - p p^T; pulled back through z = W a it is
    # W^T (diag(p) - p p^T) W. The probe's gradient is W^T (p - e_y) with y ~ p: enumerate y for the exact moments.
    torch.manual_seed(0)
    w, a, draws = torch.randn(5, 3), torch.randn(2, 3), 20000
    estimate = _squared_gradients(w, a, "kl", draws).mean(dim=0)
    p = (a @ w.T).softmax(dim=1)  # (N, K)
    grads = torch.einsum("kd,nyk->nyd", w, p[:, None, :] - torch.eye(5)[None])  # (N, y, D): gradient if class y
    mean = torch.einsum("ny,nyd->nd", p, grads.square())
    var = torch.einsum("ny,nyd->nd", p, grads.pow(4)) - mean.square()
    exact = torch.stack([torch.diag(w.T @ (torch.diag(pi) - torch.outer(pi, pi)) @ w) for pi in p])
    assert torch.allclose(mean, exact, atol=1e-5)  # the enumeration is the Fisher
    assert ((estimate - exact).abs() < 6 * (var / draws).sqrt()).all()
    assert (exact > 12 * (var / draws).sqrt()).all()  # a zero estimate would fail


def test_mse_probe_squared_gradients_estimate_the_gauss_newton_diagonal():
    # MSE averaged over the M = 4 outputs of a sample has Hessian (2 / M) I; pulled back: (2 / M) diag(W^T W).
    torch.manual_seed(0)
    w, a, draws = torch.randn(4, 3), torch.randn(2, 3), 20000
    estimate = _squared_gradients(w, a, "mse", draws).mean(dim=0)
    exact = (2 / 4) * torch.diag(w.T @ w).expand(2, 3)
    se = math.sqrt(2) * exact / math.sqrt(draws)  # g^2 = exact * chi2(1): variance 2 * exact^2
    assert ((estimate - exact).abs() < 6 * se).all()
    assert (exact > 12 * se).all()


def test_probe_is_reproducible_from_its_generator():
    x = torch.randn(3, 6, requires_grad=True)
    one = fisher_probe({"logits": x, "dense": x * 2}, "auto", torch.Generator().manual_seed(3))
    two = fisher_probe({"logits": x, "dense": x * 2}, "auto", torch.Generator().manual_seed(3))
    assert torch.equal(one, two)
