"""The CIFAR-100 recipes as their authors ran them (issue 26): CRD's negatives from other
classes, the CIFAR zoo's pre-activation taps and ReviewKD reading the teacher's, term
weights beyond a convex alpha, and each pair x method's cited settings, composed and
checked against the published formulas recomputed with numpy."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun.data.labels import UNLABELED
from kdrun.losses import build_loss
from kdrun.losses.contrastive import CRD, other_class_draws
from kdrun.losses.review import ReviewKD, hcl_loss
from kdrun.models import build_model
from kdrun.run.validate import validate
from kdrun.train.features import FeatureTap, feature_shape
from tests.helpers import KDRUN, make_config

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["cifar100_resnet32x4_resnet8x4", "cifar100_resnet56_resnet20", "cifar100_vgg13_vgg8",
         "cifar100_wrn_40_2_wrn_16_2", "cifar100_resnet32x4_ShuffleV2"]
METHODS = ["kd", "kd_ls", "dkd", "crd", "reviewkd"]

# ------------------------------------------------------------ CRD's negatives


def test_crd_negatives_are_never_the_anchor_nor_of_its_class():
    torch.manual_seed(0)
    labels = torch.arange(120) % 6  # 6 classes of 20: 100 negatives allowed per anchor
    labels[::7] = UNLABELED  # a transfer set's examples are of no class
    anchors = torch.tensor([0, 1, 5, 14, 33, 100])
    drawn = other_class_draws(labels, anchors, 80)
    assert drawn.shape == (6, 80)
    for anchor, row in zip(anchors.tolist(), drawn.tolist()):
        assert anchor not in row
        assert len(set(row)) == 80  # without replacement, as the references draw
        if labels[anchor] != UNLABELED:
            assert all(labels[i] != labels[anchor] for i in row)
    # an unlabelled anchor may contrast with every other example, labelled or not
    everyone = other_class_draws(labels, torch.tensor([0]), 119)[0].tolist()
    assert sorted(everyone) == list(range(1, 120))


def test_crd_negatives_with_replacement_only_where_too_few_and_uniform_as_before():
    labels = torch.tensor([0] * 8 + [1] * 2)
    drawn = other_class_draws(labels, torch.tensor([0, 8]), 5)
    assert set(drawn[0].tolist()) <= {8, 9}  # 2 allowed for 5 draws: with replacement
    assert len(set(drawn[1].tolist())) == 5 and set(drawn[1].tolist()) <= set(range(8))
    loss = CRD(nce_k=500, feat_dim=4, negatives="uniform")
    loss.prepare((3,), (3,))
    loss.set_examples(torch.arange(100) % 10)
    uniform = loss.contrast_indices(torch.tensor([3, 4]), 100)
    assert (uniform[:, 0] == torch.tensor([3, 4])).all()
    assert ((torch.arange(100) % 10)[uniform[:, 1:]] == torch.tensor([[3], [4]])).any()


def test_crd_defaults_to_the_references_exact_mode():
    assert CRD().negatives == "other_classes"
    assert make_config("loss=crd").loss.negatives == "other_classes"


# ---------------------------------------------------------- pre-activation taps


def _eval_model(arch: str) -> torch.nn.Module:
    """A CIFAR model in eval mode with batch-norm statistics that make its pre-ReLU
    features take both signs (fresh ones would too, but not by design)."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"arch": arch}), (3, 32, 32), 100).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _tapped(model, layers, x):
    tap = FeatureTap(model, layers)
    with torch.no_grad():
        model(x)
    tap.remove()
    return tap.value


def _block_preact(block, x):
    """A CIFAR ResNet basic block written out: bn2(conv2(relu(bn1(conv1 x)))) + shortcut."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    return out + (x if block.downsample is None else block.downsample(x))


def test_resnet_preact_taps_are_the_last_block_before_its_relu():
    model = _eval_model("resnet14")  # two blocks per stage: the tap is the last one's
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pre1, post1, pre3 = _tapped(model, ["layer1.preact", "layer1", "layer3.preact"], x)
    with torch.no_grad():
        stem = F.relu(model.bn1(model.conv1(x)))
        expected1 = _block_preact(model.layer1[1], F.relu(_block_preact(model.layer1[0], stem)))
        h = model.layer2(F.relu(expected1))
        expected3 = _block_preact(model.layer3[1], model.layer3[0](h))
    assert torch.equal(pre1, expected1) and torch.equal(pre3, expected3)
    assert torch.equal(post1, F.relu(expected1))
    assert (pre1 < 0).float().mean() > 0.1  # pre- and post-ReLU features differ


def test_wide_resnet_and_vgg_preact_taps_are_the_references():
    wrn = _eval_model("wrn_16_2")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pre1, pre3, post1 = _tapped(wrn, ["block1.preact", "block3.preact", "block1"], x)
    with torch.no_grad():  # mdistiller wrn.py: block2.layer[0].bn1(f1), bn1(f3)
        f1 = wrn.block1(wrn.conv1(x))
        f3 = wrn.block3(wrn.block2(f1))
        assert torch.equal(pre1, wrn.block2.layer[0].bn1(f1)) and torch.equal(post1, f1)
        assert torch.equal(pre3, wrn.bn1(f3))
    vgg = _eval_model("vgg8")
    pre, post = _tapped(vgg, ["block2.preact", "relu2"], x)
    with torch.no_grad():  # mdistiller vgg.py: f2_pre = block2(pool1(relu(block1(...))))
        h = vgg.pool1(F.relu(vgg.block1(vgg.pool0(F.relu(vgg.block0(x))))))
        assert torch.equal(pre, vgg.block2(h)) and torch.equal(post, F.relu(vgg.block2(h)))
    assert (pre < 0).any()


def test_a_misspelt_preact_tap_lists_the_valid_ones():
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"layer4\.preact.*layer1\.preact, layer2\.preact"):
        FeatureTap(_eval_model("resnet8"), ["layer4.preact"], "loss.teacher_layer")


def test_reviewkd_reads_the_teachers_preactivation_by_default():
    """ReviewKD on resnet14 -> resnet8: the loss from the taps the trainer sets (the
    teacher's pre-activation stages by default, as mdistiller) equals CE + weight x HCL
    of the fused student stages against the stages written out before their ReLU."""
    teacher, student = _eval_model("resnet14"), _eval_model("resnet8")
    loss = ReviewKD(weight=5.0, warmup=0).double()
    assert loss.teacher_layer == ["layer1.preact", "layer2.preact", "layer3.preact",
                                  "penultimate"]
    loss.prepare(feature_shape(student, loss.student_layer, (3, 32, 32), "s"),
                 feature_shape(teacher, loss.teacher_layer, (3, 32, 32), "t"))
    loss.double().eval()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    s_tap, t_tap = FeatureTap(student, loss.student_layer), FeatureTap(teacher, loss.teacher_layer)
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
        ours = loss(s_logits, t_logits, y, s_tap.value, t_tap.value).item()
        stem = F.relu(teacher.bn1(teacher.conv1(x)))
        pre1 = _block_preact(teacher.layer1[1], teacher.layer1[0](stem))
        pre2 = _block_preact(teacher.layer2[1], teacher.layer2[0](F.relu(pre1)))
        pre3 = _block_preact(teacher.layer3[1], teacher.layer3[0](F.relu(pre2)))
        pooled = F.relu(pre3).mean((2, 3))[:, :, None, None]
        fused, deeper = [], None
        stages = [f if f.ndim == 4 else f[:, :, None, None] for f in s_tap.value][::-1]
        for f, abf, size in zip(stages, loss.abfs, loss.out_sizes):
            out, deeper = abf(f, deeper, size)
            fused.insert(0, out)
        expected_hcl = _hcl_numpy([f.numpy() for f in fused],
                                  [t.numpy() for t in (pre1, pre2, pre3, pooled)])
        post = [F.relu(pre1), F.relu(pre2), F.relu(pre3), pooled]
        post_hcl = hcl_loss(fused, post).item()
    assert ours == pytest.approx(F.cross_entropy(s_logits, y).item() + 5.0 * expected_hcl,
                                 rel=1e-12)
    assert abs(post_hcl - expected_hcl) > 1e-3 * expected_hcl  # the choice matters


def _pool(a, size: int):
    """Average pooling of (n, c, h, h) maps to size x size: the mean of equal blocks."""
    n, c, h = a.shape[:3]
    k = h // size
    return a.reshape(n, c, size, k, size, k).mean(axis=(3, 5))


def _hcl_numpy(student: list, teacher: list) -> float:
    """ReviewKD's HCL from the paper: per stage, the MSE plus the MSEs of the maps
    average-pooled to 4, 2, 1 (those below the map's size) weighted 1/2, 1/4, 1/8,
    normalised by the weights' sum; summed over stages."""
    total = 0.0
    for s, t in zip(student, teacher):
        h, level_loss, weight, weights = s.shape[2], ((s - t) ** 2).mean(), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2
            level_loss += weight * ((_pool(s, size) - _pool(t, size)) ** 2).mean()
            weights += weight
        total += level_loss / weights
    return total


# ------------------------------------------------------------------ the recipes

# What each reference ran, per pair and method, read off the files the recipe YAMLs cite
# (independently of them): RepDistiller scripts/run_cifar_distill.sh and train_student.py,
# mdistiller engine/cfg.py and configs/cifar100/dkd/*.yaml, the logit-standardisation
# README's command, ReviewKD's CIFAR-100/script/reviewKD.sh.
KD = {"T": 4.0, "alpha": 0.9}
# the logit-standardisation README's command (base temperature 2, KD weight 9), and per pair
# the base temperature its published number's log is named with (README.md:83, :90):
# logs/KD/kd,vgg13,vgg8,3,9.txt, 3 for vgg13 -> vgg8
KD_LS = {"T": 2.0, "alpha": None, "ce_weight": 0.1, "kd_weight": 9.0}
CRD_SETTINGS = {"beta": 0.8, "alpha": 0.0, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                "momentum": 0.5, "negatives": "other_classes"}
RESNET_STAGES = (["layer1", "layer2", "layer3", "penultimate"],
                 ["layer1.preact", "layer2.preact", "layer3.preact", "penultimate"])
PUBLISHED = {
    "cifar100_resnet32x4_resnet8x4": {"dkd_beta": 8.0, "review": 5.0, "stages": RESNET_STAGES},
    "cifar100_resnet56_resnet20": {"dkd_beta": 2.0, "review": 0.6, "stages": RESNET_STAGES},
    "cifar100_vgg13_vgg8": {"dkd_beta": 6.0, "review": 1.0, "ls_temperature": 3.0, "stages": (
        ["relu1", "relu2", "relu3", "relu4", "penultimate"],
        ["block1.preact", "block2.preact", "block3.preact", "block4.preact", "penultimate"])},
    "cifar100_wrn_40_2_wrn_16_2": {"dkd_beta": 6.0, "review": 5.0, "stages": (
        ["block1", "block2", "block3", "penultimate"],
        ["block1.preact", "block2.preact", "block3.preact", "penultimate"])},
    "cifar100_resnet32x4_ShuffleV2": {"dkd_beta": 8.0, "review": 8.0, "stages": RESNET_STAGES},
}


def published(experiment: str, method: str) -> dict:
    pair = PUBLISHED[experiment]
    kd_ls = {**KD_LS, "T": pair.get("ls_temperature", KD_LS["T"])}
    return {"kd": KD, "kd_ls": kd_ls, "crd": CRD_SETTINGS,
            "dkd": {"dkd_alpha": 1.0, "dkd_beta": pair["dkd_beta"], "T": 4.0, "warmup": 20},
            "reviewkd": {"weight": pair["review"], "warmup": 20,
                         "student_layer": pair["stages"][0],
                         "teacher_layer": pair["stages"][1]}}[method]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("experiment", PAIRS)
def test_every_pair_and_method_composes_with_its_cited_settings(experiment, method):
    cfg = make_config(f"experiment={experiment}", f"loss={method}")
    validate(cfg)
    loss = OmegaConf.to_container(cfg.loss)
    assert loss["name"] == method
    assert {k: loss[k] for k in published(experiment, method)} == published(experiment, method)
    recipe = ROOT / "configs" / "recipe" / experiment / f"{method}.yaml"
    for line in recipe.read_text().splitlines():  # every value names where it comes from
        if re.match(r"\s+\w+: ", line) and "null" not in line:
            assert re.search(r"# .*\.(py|sh|yaml|md):\d+", line), f"{recipe.name}: {line}"


@pytest.mark.parametrize("experiment", PAIRS)
def test_reviewkd_stages_of_each_pair_exist_and_fit(experiment):
    cfg = make_config(f"experiment={experiment}", "loss=reviewkd")
    teacher = build_model(cfg.teacher, (3, 32, 32), 100)
    student = build_model(cfg.student, (3, 32, 32), 100)
    loss = build_loss(cfg.loss)
    loss.prepare(feature_shape(student, loss.student_layer, (3, 32, 32), "loss.student_layer"),
                 feature_shape(teacher, loss.teacher_layer, (3, 32, 32), "loss.teacher_layer"))
    assert len(loss.abfs) == len(loss.student_layer)


def test_a_loss_without_a_recipe_keeps_its_defaults_and_command_line_values_win():
    assert make_config("experiment=cifar100_resnet56_resnet20", "loss=fitnet").loss.beta == 100
    cfg = make_config("experiment=cifar100_resnet56_resnet20", "loss=dkd", "loss.dkd_beta=3")
    assert cfg.loss.dkd_beta == 3 and cfg.loss.warmup == 20
    assert make_config("loss=dkd").loss.warmup == 0  # no experiment: the loss's own YAML


def test_cfg_job_shows_the_cited_settings():
    out = subprocess.run([KDRUN, "experiment=cifar100_resnet56_resnet20", "loss=reviewkd",
                          "--cfg", "job"], capture_output=True, text=True, check=True).stdout
    loss = OmegaConf.create(out).loss
    assert (loss.weight, loss.teacher_layer[0]) == (0.6, "layer1.preact")


# ------------------------------------- the published formulas, recomputed with numpy


def _log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def _zscore(a):
    return (a - a.mean(1, keepdims=True)) / (1e-7 + a.std(1, ddof=1, keepdims=True))


def _kd_numpy(s, t, y, T, ce_weight, kd_weight, standardise):
    """Hinton's KD as the references weight it: ce_weight * CE + kd_weight * T^2 * KL,
    the KL on z-scored logits with logit standardisation (Sun et al. 2024, eq. 5)."""
    ss, tt = (_zscore(s), _zscore(t)) if standardise else (s, t)
    ls, lt = _log_softmax(ss / T), _log_softmax(tt / T)
    kl = (np.exp(lt) * (lt - ls)).sum(1).mean()
    ce = -_log_softmax(s)[np.arange(len(y)), y].mean()
    return ce_weight * ce + kd_weight * T**2 * kl


def _dkd_numpy(s, t, y, T, alpha, beta, ramp):
    """DKD (Zhao et al. 2022, eq. 7): CE + ramp * T^2 * (alpha * KL(b_t || b_s) + beta *
    KL(p^_t || p^_s)), b = (p_target, 1 - p_target), p^ the softmax over the other classes."""
    def parts(z):
        p = np.exp(_log_softmax(z / T))
        target = p[np.arange(len(y)), y]
        b = np.stack([target, 1 - target], 1)
        others = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z / T)
        return b, np.exp(_log_softmax(others))

    (bs, qs), (bt, qt) = parts(s), parts(t)
    tckd = (bt * np.log(bt / bs)).sum(1).mean()
    mask = qt > 0
    nckd = (np.where(mask, qt * np.log(np.where(mask, qt, 1) / np.where(mask, qs, 1)), 0)
            ).sum(1).mean()
    ce = -_log_softmax(s)[np.arange(len(y)), y].mean()
    return ce + ramp * T**2 * (alpha * tckd + beta * nckd)


@pytest.mark.parametrize("experiment", PAIRS)
def test_the_logit_recipes_equal_the_published_formulas(experiment):
    torch.manual_seed(1)
    s = torch.randn(16, 100, dtype=torch.float64) * 3
    t = torch.randn(16, 100, dtype=torch.float64) * 5
    y = torch.randint(0, 100, (16,))
    sn, tn, yn = s.numpy(), t.numpy(), y.numpy()
    for method, expected in (
            ("kd", _kd_numpy(sn, tn, yn, 4.0, 0.1, 0.9, False)),
            ("kd_ls", _kd_numpy(sn, tn, yn, published(experiment, "kd_ls")["T"], 0.1, 9.0,
                                True))):
        loss = build_loss(make_config(f"experiment={experiment}", f"loss={method}").loss)
        assert loss(s, t, y).item() == pytest.approx(expected, rel=1e-9), method
    dkd = build_loss(make_config(f"experiment={experiment}", "loss=dkd").loss)
    beta = PUBLISHED[experiment]["dkd_beta"]
    for epoch, ramp in ((5, 5 / 20), (30, 1.0)):  # mdistiller's epochs count from 1
        dkd.start_epoch(epoch)
        assert dkd(s, t, y).item() == pytest.approx(
            _dkd_numpy(sn, tn, yn, 4.0, 1.0, beta, ramp), rel=1e-9), epoch


def test_the_logit_standardisation_dkd_command_is_expressible():
    """Sun et al.'s DKD command (--logit-stand --base-temp 2 --kd-weight 9: alpha and
    beta times 9, T=2; LS tools/train.py:116-118) through loss=dkd's own keys."""
    torch.manual_seed(2)
    s, t, y = torch.randn(8, 100, dtype=torch.float64), torch.randn(8, 100, dtype=torch.float64), \
        torch.randint(0, 100, (8,))
    cfg = make_config("experiment=cifar100_resnet32x4_resnet8x4", "loss=dkd", "loss.T=2",
                      "loss.dkd_alpha=9", "loss.dkd_beta=72", "loss.logit_std=true")
    loss = build_loss(cfg.loss)
    loss.start_epoch(20)
    expected = _dkd_numpy(_zscore(s.numpy()), _zscore(t.numpy()), y.numpy(), 2.0, 9.0, 72.0, 1.0)
    ce_z = -_log_softmax(_zscore(s.numpy()))[np.arange(8), y.numpy()].mean()
    ce = F.cross_entropy(s, y).item()  # CE on the raw logits, the terms on z-scored ones
    assert loss(s, t, y).item() == pytest.approx(expected - ce_z + ce, rel=1e-9)


def test_term_weights_beyond_a_convex_alpha_on_a_feature_loss():
    """RepDistiller's CRD+KD (-r 1 -a 1 -b 0.8: README line 64): CE 1 + KD 1 + CRD 0.8,
    which no alpha in [0, 1] expresses; the KD part equals the formula."""
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64), \
        torch.tensor([0, 1, 2, 3, 4, 5])
    both = CRD(alpha=None, ce_weight=1.0, kd_weight=1.0, T=4.0, nce_k=8, feat_dim=4)
    none = CRD(alpha=0.0, nce_k=8, feat_dim=4)
    kd_part = both.base(s, t, y).item() - none.base(s, t, y).item()
    assert kd_part == pytest.approx(
        _kd_numpy(s.numpy(), t.numpy(), y.numpy(), 4.0, 0.0, 1.0, False), rel=1e-9)


def test_a_tap_that_an_in_place_relu_overwrites_is_refused_not_read_wrong():
    from kdrun.errors import ConfigError

    model = _eval_model("resnet8")  # layer1.0.bn1 feeds an in-place ReLU
    tap = FeatureTap(model, "layer1.0.bn1", "loss.student_layer")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ConfigError, match="loss.student_layer.*overwritten in place"):
        _ = tap.value


@pytest.mark.slow  # two CIFAR-format pipelines through the recipes
@pytest.mark.parametrize("loss", ["reviewkd", "crd"])
def test_the_feature_recipes_train_end_to_end_on_tiny_cifar100_files(tmp_path, skip_cifar_md5,
                                                                     loss):
    """ReviewKD (the teacher's pre-activation stages, cached) and CRD (negatives of other
    classes, drawn with replacement: 16,384 exceed this set) through the pipeline, with a
    resnet56 -> resnet20 recipe on smaller models of the same stage names."""
    from kdrun.run import pipeline
    from tests.helpers import write_cifar

    write_cifar(tmp_path / "data", classes=100, n_per_batch=8)
    cfg = make_config("experiment=cifar100_resnet56_resnet20", "teacher=resnet14",
                      "student=resnet8", f"loss={loss}", f"dataset.root={tmp_path}/data",
                      "trainer.epochs=2", "trainer.batch_size=8", "progress=false",
                      "repeats=1", "latency.repeats_b1=2", "latency.repeats_b256=2",
                      "latency.warmup=0", f"cache.dir={tmp_path}/cache")
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert [r["role"] for r in rows] == ["teacher", "scratch", "distilled"]
    assert rows[2]["method"] == loss and 0 <= rows[2]["test_metric_best_val"] <= 100
