"""The methods beyond KD: each against an independent computation (numpy or plain
math), its paper's special cases, and where its gradient goes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdrun.losses import AT, DIST, DKD, KD, LOSSES, PKT, RKD, SP, FitNet, MSELogits
from kdrun.losses.response import dkd_parts
from kdrun.run import pipeline
from tests.helpers import make_config

torch.manual_seed(0)
# float64 (the values float32 draws), so that comparisons with an independent computation
# hold on any CPU; a loss trains in float64 too with trainer.float64
S = torch.randn(6, 5).double()  # student logits: 6 samples x 5 classes
T_ = (torch.randn(6, 5) * 2).double()  # teacher logits
Y = torch.tensor([0, 1, 2, 3, 4, 0])
FS = torch.randn(6, 8).double()  # student embedding
FT = torch.randn(6, 12).double()  # teacher embedding (another width)


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


def test_logit_std_switch_on_kd_and_dkd_by_numpy():
    """loss.logit_std (Sun et al. 2024) on kd equals kd_ls; on dkd, the DKD terms of the
    numpy-z-scored logits (mean 0, unbiased std 1 per row) plus CE on the raw ones."""
    from kdrun.losses.standardized import LogitStandardKD

    s, t = S.double(), T_.double()
    kd = KD(T=3.0, alpha=0.6, logit_std=True)(s, t, Y).item()
    assert kd == pytest.approx(LogitStandardKD(T=3.0, alpha=0.6)(s, t, Y).item(), rel=1e-12)
    z = lambda a: (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))  # noqa: E731
    zs, zt = (torch.from_numpy(z(a.numpy())) for a in (s, t))
    T = 4.0
    ps = np.exp(zs.numpy() / T) / np.exp(zs.numpy() / T).sum(1, keepdims=True)
    pt = np.exp(zt.numpy() / T) / np.exp(zt.numpy() / T).sum(1, keepdims=True)
    tckd, nckd = [], []
    for i, g in enumerate(Y.tolist()):
        bs, bt = np.array([ps[i, g], 1 - ps[i, g]]), np.array([pt[i, g], 1 - pt[i, g]])
        qs, qt = np.delete(ps[i], g) / (1 - ps[i, g]), np.delete(pt[i], g) / (1 - pt[i, g])
        tckd.append((bt * np.log(bt / bs)).sum())
        nckd.append((qt * np.log(qt / qs)).sum())
    expected = F.cross_entropy(s, Y).item() + T**2 * (np.mean(tckd) + 8 * np.mean(nckd))
    assert DKD(T=T, logit_std=True)(s, t, Y).item() == pytest.approx(expected, rel=1e-9)
    # invariant to the teacher's logit scale and shift, as standardisation promises
    a = DKD(T=T, logit_std=True)
    assert a(s, t * 7 + 2, Y).item() == pytest.approx(a(s, t, Y).item(), rel=1e-6)


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
    loss.double()  # as fit moves it with trainer.float64
    with torch.no_grad():
        linear = loss.regressor[1]
        linear.weight.copy_(torch.eye(8))
        linear.bias.zero_()
    target = torch.randn(6, 8).double()
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
    if isinstance(loss.student_layer, list):  # stages (ReviewKD): a map and a pooled feature
        s_pooled, t_pooled = torch.randn(6, 7, requires_grad=True), torch.randn(6, 9)
        loss.prepare([(3, 4, 4), (7,)], [(5, 4, 4), (9,)])
        loss.abfs.train()
        s_feat, t_feat, s_list, t_list = [s_feat, s_pooled], [t_feat, t_pooled], True, True
    else:
        s_list = t_list = False
        loss.prepare(tuple(s_feat.shape[1:]), tuple(t_feat.shape[1:]))
    if loss.reads_indices:  # e.g. CRD's memory bank, one entry per training example
        loss.set_examples(torch.arange(6) % 3)
        loss.set_batch(torch.arange(6))
    loss(s_logits, t_logits, Y, s_feat, t_feat).backward()
    assert s_logits.grad is not None and torch.isfinite(s_logits.grad).all()
    t_feats, s_feats = (t_feat if t_list else [t_feat]), (s_feat if s_list else [s_feat])
    assert t_logits.grad is None and all(t.grad is None for t in t_feats)
    if loss.reads_features:
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s_feats)
    for p in loss.parameters():  # e.g. FitNet's regressor
        assert p.grad is not None and p.grad.abs().sum() > 0


# ReviewKD fuses 2-D feature maps of image models: test_reviewkd_runs_on_tiny_cifar_files
@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - {"reviewkd"}))
def test_every_loss_runs_end_to_end_on_the_default_data(tmp_path, name):
    students = ["student=cnn", "student.channels=[8,8,8]"] if name == "at" else []
    students += ["loss.nce_k=64"] if name == "crd" else []  # the paper's 16 384: a GPU's
    cfg = make_config(f"loss={name}", *students, "repeats=1", "trainer.epochs=1",
                      "split.max_train=300", "progress=false", f"cache.dir={tmp_path}/c")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(math.isfinite(r["test_metric_last"]) for r in rows)


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


def test_crd_by_numpy(monkeypatch):
    """CRD (Tian et al. 2020) on fixed memory banks and fixed draws: embeddings, scores
    exp(<v, m> / t) normalised by Z = mean x n (fixed on the first batch), the NCE loss of
    each side, and the momentum update of both banks, recomputed with numpy."""
    from kdrun.losses.contrastive import CRD

    torch.manual_seed(3)
    loss = CRD(beta=0.8, feat_dim=3, nce_k=4, nce_t=0.5, momentum=0.5)
    loss.prepare((6,), (5,))
    n = 10
    loss.set_examples(torch.arange(n) % 3)
    idx, contrast = torch.tensor([3, 7]), torch.tensor([[3, 1, 2, 3, 9], [7, 0, 0, 5, 8]])
    monkeypatch.setattr(loss, "contrast_indices", lambda indices, size: contrast)
    fs, ft, z, y = torch.randn(2, 6), torch.randn(2, 5), torch.randn(2, 4), torch.tensor([1, 2])
    bank_s, bank_t = loss.memory_student.numpy().copy(), loss.memory_teacher.numpy().copy()
    w = {k: v.detach().numpy() for k, v in loss.named_parameters()}
    loss.set_batch(idx)
    ours = loss(z, torch.randn(2, 4), y, fs, ft).item()

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def nce(bank, v):
        scores = np.exp(np.einsum("bkd,bd->bk", bank[contrast.numpy()], v) / 0.5)
        p = scores / (scores.mean() * n)
        noise = 4 / n
        pos = np.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
        neg = np.log(noise / (p[:, 1:] + noise + 1e-7))
        return -(pos.sum() + neg.sum()) / 2, scores.mean() * n

    v_s = unit(fs.numpy() @ w["embed_student.weight"].T + w["embed_student.bias"])
    v_t = unit(ft.numpy() @ w["embed_teacher.weight"].T + w["embed_teacher.bias"])
    (nce_s, z_s), (nce_t, _) = nce(bank_t, v_s), nce(bank_s, v_t)
    expected = F.cross_entropy(z, y).item() + 0.8 * (nce_s + nce_t)
    assert ours == pytest.approx(expected, rel=1e-5)
    assert loss.memory_student[3].numpy() == pytest.approx(
        unit(0.5 * bank_s[[3]] + 0.5 * v_s[[0]])[0], rel=1e-5)
    assert loss.memory_teacher[7].numpy() == pytest.approx(
        unit(0.5 * bank_t[[7]] + 0.5 * v_t[[1]])[0], rel=1e-5)
    assert loss.memory_student[5].numpy() == pytest.approx(bank_s[5])  # not in the batch
    # the normaliser is fixed by the first batch; a later batch keeps it
    assert loss.z_student.item() == pytest.approx(z_s, rel=1e-5)
    loss(z, None, y, fs * 2, ft)
    assert loss.z_student.item() == pytest.approx(z_s, rel=1e-5)
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(
        loss.state_dict())  # saved with a resumable state


def test_hcl_by_numpy():
    """ReviewKD's hierarchical context loss: per stage, (MSE + 1/2 MSE of 4x4-pooled + 1/4
    MSE of 2x2-pooled + 1/8 MSE of 1x1-pooled) / (1 + 1/2 + 1/4 + 1/8) on an 8x8 map; a
    4x4 map skips the 4x4 level; a 1x1 map is its MSE alone."""
    from kdrun.losses.review import hcl_loss

    torch.manual_seed(5)
    pairs = [(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)),
             (torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)),
             (torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1))]

    def pool(a, size):  # average over equal blocks
        n, c, h, _ = a.shape
        k = h // size
        return a.reshape(n, c, size, k, size, k).mean(axis=(3, 5))

    def mse(a, b):
        return ((a - b) ** 2).mean()

    expected = 0.0
    for s, t in pairs:
        s, t = s.numpy().astype(np.float64), t.numpy().astype(np.float64)
        h = s.shape[2]
        levels = [size for size in (4, 2, 1) if size < h]
        weights = [0.5 ** (i + 1) for i in range(len(levels))]
        total = mse(s, t) + sum(w * mse(pool(s, k), pool(t, k)) for w, k in zip(weights, levels))
        expected += total / (1 + sum(weights))
    ours = hcl_loss([p[0] for p in pairs], [p[1] for p in pairs]).item()
    assert ours == pytest.approx(expected, rel=1e-5)


def test_reviewkd_fuses_deepest_first_and_matches_each_teacher_stage():
    from kdrun.losses.review import ReviewKD

    loss = ReviewKD(warmup=4)
    s_shapes, t_shapes = [(8, 16, 16), (16, 8, 8), (32,)], [(16, 16, 16), (32, 8, 8), (64,)]
    loss.prepare(s_shapes, t_shapes)
    # deepest first: the pooled stage has no fusion; widths min(512, 32) = 32
    assert [abf.att_conv is None for abf in loss.abfs] == [True, False, False]
    assert [abf.conv2[0].out_channels for abf in loss.abfs] == [64, 32, 16]
    assert loss.out_sizes == [1, 8, 16]
    feats = [torch.randn(2, *s) for s in s_shapes]
    targets = [torch.randn(2, *t) for t in t_shapes]
    loss.start_epoch(1)
    quarter = loss(S[:2], None, Y[:2], feats, targets)
    loss.start_epoch(10)
    full = loss(S[:2], None, Y[:2], feats, targets)
    ce = F.cross_entropy(S[:2], Y[:2])
    assert (quarter - ce).item() == pytest.approx(0.25 * (full - ce).item(), rel=1e-5)


def test_reviewkd_runs_on_tiny_cifar_files(tmp_path, skip_cifar_md5):
    from tests.helpers import write_cifar

    write_cifar(tmp_path / "data", classes=10, n_per_batch=8)
    cfg = make_config("dataset=cifar10", f"dataset.root={tmp_path}/data", "teacher=resnet14",
                      "student=resnet8", "loss=reviewkd", "repeats=1", "trainer.epochs=2",
                      "progress=false", "latency.repeats_b1=4", "latency.repeats_b256=4",
                      "latency.warmup=0", f"cache.dir={tmp_path}/c")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert all(math.isfinite(r["test_metric_last"]) for r in rows)


def test_uld_equals_an_independent_computation_of_the_sorted_distance():
    from kdrun.losses.divergence import ULD

    torch.manual_seed(0)
    student = torch.randn(3, 5, dtype=torch.float64)  # 5 student tokens
    teacher = torch.randn(3, 7, dtype=torch.float64)  # 7 teacher tokens: another vocabulary
    labels = torch.tensor([0, 4, 2])
    by_hand = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p_s = sorted((math.exp(v / 2) for v in s_row), reverse=True)
        p_t = sorted((math.exp(v / 2) for v in t_row), reverse=True)
        p_s = [v / sum(p_s) for v in p_s] + [0.0, 0.0]  # padded to the wider vocabulary
        p_t = [v / sum(p_t) for v in p_t]
        by_hand += sum(abs(a - b) for a, b in zip(p_s, p_t)) / 3
    ce = sum(-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))
             for row, y in zip(student.tolist(), labels.tolist())) / 3
    loss = ULD(T=2.0, alpha=0.25)(student, teacher, labels)
    assert float(loss) == pytest.approx(0.25 * 4 * by_hand + 0.75 * ce, rel=1e-12)
    same = ULD(alpha=1.0)(teacher, teacher.flip(-1), labels)  # a permuted vocabulary: 0
    assert float(same) == pytest.approx(0.0, abs=1e-15)
