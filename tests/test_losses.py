"""The KD loss against hand computation, its special cases, and the bugs seen in the wild."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses import CE, KD, build_loss

# float64, so that the comparisons with hand computation hold on any CPU: a float32 loss
# rounds to ~1e-7 relative, and a KL near zero cancels, which amplifies that
F64 = torch.float64
S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], dtype=F64)  # student logits: 2 x 3 classes
T_ = torch.tensor([[1.0, 1.5, -0.5], [-1.0, 0.0, 2.0]], dtype=F64)  # teacher logits
Y = torch.tensor([0, 2])


def softmax(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def hand_kd(s, t, y, T, alpha):
    """Hinton's loss written out with math.exp and math.log, one sample at a time."""
    kl = ce = 0.0
    for srow, trow, label in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax(srow, T), softmax(trow, T)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
        ce += -math.log(softmax(srow, 1.0)[label])
    n = len(y)
    return alpha * T**2 * kl / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (7.0, 0.8), (0.5, 0.3)])
def test_kd_matches_hand_computation(T, alpha):
    got = KD(T=T, alpha=alpha)(S, T_, Y).item()
    assert got == pytest.approx(hand_kd(S, T_, Y, T, alpha), rel=1e-5)


def test_alpha_zero_is_cross_entropy():
    assert KD(T=4, alpha=0.0)(S, T_, Y).item() == pytest.approx(F.cross_entropy(S, Y).item())


def test_alpha_one_T_one_is_batchmean_kl():
    reference = F.kl_div(F.log_softmax(S, 1), F.softmax(T_, 1), reduction="batchmean")
    assert KD(T=1, alpha=1.0)(S, T_, Y).item() == pytest.approx(reference.item(), rel=1e-6)


def test_t2_factor():
    T = 5.0
    scaled = KD(T=T, alpha=1.0, t2_scale=True)(S, T_, Y).item()
    plain = KD(T=T, alpha=1.0, t2_scale=False)(S, T_, Y).item()
    assert scaled == pytest.approx(plain * T**2, rel=1e-6)


def test_soft_term_is_zero_when_student_equals_teacher():
    assert KD(T=3, alpha=1.0)(T_, T_.clone(), Y).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_only_to_the_student():
    s = S.clone().requires_grad_(True)
    t = T_.clone().requires_grad_(True)
    KD(T=4, alpha=0.9)(s, t, Y).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_soft_gradient_matches_closed_form():
    """d/ds of T^2 KL(p_t^T || p_s^T), batchmean, is T (p_s^T - p_t^T) / N (Hinton eq. 2)."""
    T = 3.0
    s = S.clone().requires_grad_(True)
    KD(T=T, alpha=1.0)(s, T_, Y).backward()
    expected = T * (F.softmax(S / T, 1) - F.softmax(T_ / T, 1)) / len(Y)
    assert torch.allclose(s.grad, expected, atol=1e-6)


# The bugs the design doc lists: each buggy variant must give a different value from ours.


def test_not_double_softmax():
    double = F.cross_entropy(F.softmax(S, 1), Y)
    assert CE()(S, None, Y).item() != pytest.approx(double.item(), rel=1e-3)
    assert CE()(S, None, Y).item() == pytest.approx(F.cross_entropy(S, Y).item())


def test_not_swapped_kl():
    swapped = F.kl_div(F.log_softmax(T_, 1), F.softmax(S, 1), reduction="batchmean")
    assert KD(T=1, alpha=1.0)(S, T_, Y).item() != pytest.approx(swapped.item(), rel=1e-3)


def test_not_probabilities_as_input():
    wrong = F.kl_div(F.softmax(S, 1), F.softmax(T_, 1), reduction="batchmean")
    assert KD(T=1, alpha=1.0)(S, T_, Y).item() != pytest.approx(wrong.item(), rel=1e-3)


@pytest.mark.filterwarnings("ignore:reduction")
def test_not_reduction_mean():
    """reduction='mean' divides by the number of classes too."""
    ours = KD(T=1, alpha=1.0)(S, T_, Y).item()
    wrong = F.kl_div(F.log_softmax(S, 1), F.softmax(T_, 1), reduction="mean").item()
    assert ours == pytest.approx(wrong * S.shape[1], rel=1e-6)


def test_registry_builds_from_config():
    loss = build_loss({"name": "kd", "T": 2.0, "alpha": 0.25, "t2_scale": False})
    assert isinstance(loss, KD) and (loss.T, loss.alpha, loss.t2_scale) == (2.0, 0.25, False)
    assert build_loss({"name": "ce"}).needs_teacher is False
