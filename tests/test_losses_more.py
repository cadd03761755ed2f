"""The methods beyond KD: each against an independent computation (numpy or plain
math), its paper's special cases, and where its gradient goes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdrun import pipeline
from kdrun.losses import AT, DIST, DKD, KD, LOSSES, PKT, RKD, SP, FitNet, MSELogits
from kdrun.losses.response import dkd_parts
from tests.helpers import make_config

torch.manual_seed(0)
S = torch.randn(6, 5)  # student logits: 6 samples x 5 classes
T_ = torch.randn(6, 5) * 2  # teacher logits
Y = torch.tensor([0, 1, 2, 3, 4, 0])
FS = torch.randn(6, 8)  # student embedding
FT = torch.randn(6, 12)  # teacher embedding (another width)


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def test_mse_logits():
    got = MSELogits(beta=0.7)(S, T_, Y).item()
    expected = 0.3 * F.cross_entropy(S, Y).item() + 0.7 * ((S - T_) ** 2).mean().item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_dkd_parts_by_hand_and_the_papers_identity():
    T = 2.0
    tckd, nckd, p_gt = dkd_parts(S, T_, Y, T)
    for i in range(len(Y)):
        ps, pt = softmax(S[i].numpy() / T), softmax(T_[i].numpy() / T)
        g = Y[i].item()
        bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        assert tckd[i].item() == pytest.approx(float((bt * np.log(bt / bs)).sum()), rel=1e-4)
        qs, qt = np.delete(ps, g) / (1 - ps[g]), np.delete(pt, g) / (1 - pt[g])
        assert nckd[i].item() == pytest.approx(float((qt * np.log(qt / qs)).sum()), rel=1e-4)
        # eq. 7: KL(p_t || p_s) = TCKD + (1 - p_t[gt]) * NCKD
        kl = float((pt * np.log(pt / ps)).sum())
        assert kl == pytest.approx(tckd[i].item() + (1 - p_gt[i].item()) * nckd[i].item(),
                                   rel=1e-4)


def test_dkd_total_and_warmup():
    loss = DKD(dkd_alpha=1.0, dkd_beta=8.0, T=4.0, warmup=4)
    tckd, nckd, _ = dkd_parts(S, T_, Y, 4.0)
    term = 16 * (tckd.mean() + 8 * nckd.mean())
    ce = F.cross_entropy(S, Y)
    loss.start_epoch(1)
    assert loss(S, T_, Y).item() == pytest.approx((ce + 0.25 * term).item(), rel=1e-5)
    loss.start_epoch(9)
    assert loss(S, T_, Y).item() == pytest.approx((ce + term).item(), rel=1e-5)


def test_dkd_gradient_is_finite_for_a_confident_teacher():
    s = S.clone().requires_grad_(True)
    DKD()(s, T_ * 50, Y).backward()  # near one-hot teacher: log(0)-style traps
    assert torch.isfinite(s.grad).all()


def test_dist_by_numpy_pearson():
    T = 4.0
    ps = F.softmax(S / T, 1).numpy()
    pt = F.softmax(T_ / T, 1).numpy()
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(len(ps))])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    expected = F.cross_entropy(S, Y).item() + T**2 * (2 * inter + 3 * intra)
    assert DIST(beta=2, gamma=3, T=T)(S, T_, Y).item() == pytest.approx(expected, rel=1e-4)


def test_fitnet_with_identity_regressor_is_ce_plus_beta_mse():
    loss = FitNet(beta=10.0)
    loss.prepare((8,), (8,))
    with torch.no_grad():
        linear = loss.regressor[1]
        linear.weight.copy_(torch.eye(8))
        linear.bias.zero_()
    target = torch.randn(6, 8)
    expected = F.cross_entropy(S, Y) + 10 * ((FS - target) ** 2).mean()
    assert loss(S, T_, Y, FS, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_fitnet_regressor_is_a_1x1_conv_for_maps_of_the_same_size():
    loss = FitNet()
    loss.prepare((4, 7, 7), (16, 7, 7))
    assert isinstance(loss.regressor, torch.nn.Conv2d) and loss.regressor.kernel_size == (1, 1)


def test_attention_transfer_by_hand():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)

    def att(f):
        a = (f.numpy() ** 2).mean(1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = F.cross_entropy(S[:2], Y[:2]).item() + 500 * ((att(s) - att(t)) ** 2).mean()
    assert AT(beta=1000)(S[:2], T_[:2], Y[:2], s, t).item() == pytest.approx(expected, rel=1e-5)
    assert AT()(S[:2], T_[:2], Y[:2], t, t).item() == pytest.approx(
        F.cross_entropy(S[:2], Y[:2]).item(), rel=1e-6)  # same maps: no attention term
    AT()(S[:2], T_[:2], Y[:2], torch.randn(2, 3, 8, 8), t)  # 8x8 is pooled to 4x4


def test_rkd_is_zero_for_a_scaled_copy_and_positive_otherwise():
    ce = F.cross_entropy(S, Y).item()
    assert RKD()(S, T_, Y, FS, 3 * FS).item() == pytest.approx(ce, abs=1e-5)
    assert RKD()(S, T_, Y, FS, FT).item() > ce + 1e-3


def test_sp_by_numpy_with_the_papers_l2_rows():
    def g(f):
        gram = f @ f.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    fs, ft = FS.numpy(), FT.numpy()
    expected = F.cross_entropy(S, Y).item() + 3000 * ((g(fs) - g(ft)) ** 2).sum() / 36
    assert SP()(S, T_, Y, FS, FT).item() == pytest.approx(expected, rel=1e-4)
    assert SP()(S, T_, Y, FS, FS.clone()).item() == pytest.approx(F.cross_entropy(S, Y).item())

    def g_l1(f):
        gram = f @ f.T
        return gram / np.abs(gram).sum(1, keepdims=True)

    wrong = F.cross_entropy(S, Y).item() + 3000 * ((g_l1(fs) - g_l1(ft)) ** 2).sum() / 36
    assert SP()(S, T_, Y, FS, FT).item() != pytest.approx(wrong, rel=1e-3)


def test_pkt_by_numpy():
    def cond(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = cond(FS.numpy()), cond(FT.numpy())
    term = (pt * np.log((pt + 1e-7) / (ps + 1e-7))).mean()
    expected = F.cross_entropy(S, Y).item() + 30000 * term
    assert PKT()(S, T_, Y, FS, FT).item() == pytest.approx(expected, rel=1e-4)


def test_alpha_adds_hintons_kd_to_a_feature_loss():
    with_kd = SP(gamma=0.0, alpha=0.6, T=3.0)(S, T_, Y, FS, FT).item()
    assert with_kd == pytest.approx(KD(T=3.0, alpha=0.6)(S, T_, Y).item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - {"ce"}))
def test_gradient_reaches_student_and_regressor_never_teacher(name):
    loss = LOSSES.get(name, "loss.name")()
    s_logits, t_logits = S.clone().requires_grad_(True), T_.clone().requires_grad_(True)
    s_feat = torch.randn(6, 3, 4, 4, requires_grad=True)
    t_feat = torch.randn(6, 5, 4, 4, requires_grad=True)
    loss.prepare(tuple(s_feat.shape[1:]), tuple(t_feat.shape[1:]))
    loss(s_logits, t_logits, Y, s_feat, t_feat).backward()
    assert s_logits.grad is not None and torch.isfinite(s_logits.grad).all()
    assert t_logits.grad is None and t_feat.grad is None
    if loss.reads_features:
        assert s_feat.grad is not None and s_feat.grad.abs().sum() > 0
    for p in loss.parameters():  # e.g. FitNet's regressor
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_runs_end_to_end_on_the_default_data(tmp_path, name):
    students = ["student=cnn", "student.channels=[8,8,8]"] if name == "at" else []
    cfg = make_config(f"loss={name}", *students, "repeats=1", "trainer.epochs=1",
                      "split.max_train=300", "progress=false", f"cache.dir={tmp_path}/c")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(math.isfinite(r["test_acc_last"]) for r in rows)


def test_dml_is_each_members_ce_plus_kl_to_its_detached_peers():
    from kdrun.losses import DML
    from kdrun.models import Cohort

    z1, z2 = S.clone().requires_grad_(True), T_.clone().requires_grad_(True)
    cohort = Cohort([torch.nn.Identity(), torch.nn.Identity()])
    cohort.outputs = [z1, z2]
    loss = DML(T=2.0)
    loss.attach(cohort)
    value = loss(z1, None, Y)
    kl = lambda p, q: F.kl_div(F.log_softmax(q / 2, 1), F.softmax(p / 2, 1),  # noqa: E731
                               reduction="batchmean")
    expected = F.cross_entropy(S, Y) + F.cross_entropy(T_, Y) + 4 * (kl(T_, S) + kl(S, T_))
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    own = S.clone().requires_grad_(True)
    (F.cross_entropy(own, Y) + 4 * kl(T_, own)).backward()  # member 1's own terms only
    assert torch.allclose(z1.grad, own.grad, atol=1e-6)
    assert list(loss.parameters()) == []  # the cohort is not a part of the loss


def test_attention_transfer_runs_with_any_student_that_has_a_feature_map(tmp_path):
    cfg = make_config("dataset=digits", "student=dsconv", "student.base=4", "loss=at",
                      "repeats=1", "trainer.epochs=1", "progress=false",
                      f"cache.dir={tmp_path}/c")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["arch"] for r in rows] == ["cnn[32,32,32]+fc[128]", "dsconv[4]", "dsconv[4]"]


def test_logit_standardised_kd_by_numpy():
    from kdrun.losses.standardized import LogitStandardKD

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    s, t, y = S.double().numpy(), T_.double().numpy(), Y.numpy()
    T, alpha = 2.0, 0.7
    ls, lt = log_softmax(z(s) / T), log_softmax(z(t) / T)
    kl = (np.exp(lt) * (lt - ls)).sum(1).mean()
    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    expected = alpha * T**2 * kl + (1 - alpha) * ce
    ours = LogitStandardKD(T=T, alpha=alpha)(S.double(), T_.double(), Y).item()
    assert ours == pytest.approx(expected, rel=1e-9)
    scaled = LogitStandardKD(T=T, alpha=1.0)
    assert scaled(S, T_ * 5 + 3, Y).item() == pytest.approx(scaled(S, T_, Y).item(), rel=1e-4)
