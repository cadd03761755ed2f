"""The fast paths must not change what is computed: batch order, on-device
augmentation, cached teacher logits. Where a fast path only reorders the arithmetic, both
sides run in float64 (tests.helpers.FLOAT64_WEIGHT_BOUND says why its bound holds)."""

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import epoch_batches
from kdrun.data.augment import make_augment, random_crop, random_hflip, random_rotation
from kdrun.errors import ConfigError
from kdrun.losses import DistillationLoss
from kdrun.models import build_model
from kdrun.run import pipeline
from kdrun.run.stages import Stages
from kdrun.store.files import load_checkpoint
from kdrun.train.fit import EpochMeter
from kdrun.train.optim import make_optimizer
from kdrun.train.targets import CachedLogits, LiveTeacher, predict_logits
from tests.helpers import FLOAT64_WEIGHT_BOUND, assert_float64_weights_agree, make_config


def test_epoch_batches_visit_every_example_once_in_a_seeded_order():
    batches = epoch_batches(103, 10, torch.Generator().manual_seed(5), "cpu")
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(torch.cat(batches).tolist()) == list(range(103))
    again = torch.cat(epoch_batches(103, 10, torch.Generator().manual_seed(5), "cpu"))
    other = torch.cat(epoch_batches(103, 10, torch.Generator().manual_seed(6), "cpu"))
    assert torch.equal(torch.cat(batches), again) and not torch.equal(again, other)


def test_random_crop_cuts_a_window_of_the_zero_padded_image():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 5, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)


def test_random_hflip_mirrors_some_images_and_keeps_the_rest():
    x = torch.randn(64, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54 and out.dtype == x.dtype


def test_batched_rotation_matches_torchvision_rotate_at_the_same_angles():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    x = torch.rand(6, 3, 15, 15)
    out = random_rotation(x, 40.0, torch.Generator().manual_seed(0))
    angles = (torch.rand(6, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 40.0
    for image, angle, rotated in zip(x, angles, out):
        expected = tvf.rotate(image, angle.item(), interpolation=InterpolationMode.NEAREST)
        assert torch.equal(rotated, expected)
    assert not torch.equal(out, x)


def test_augmentation_is_off_unless_configured_and_refuses_sequences():
    off = OmegaConf.create({"crop_padding": 0, "hflip": False})
    assert make_augment(off, (1, 28, 28)) is None and make_augment(None, (1, 40)) is None
    with pytest.raises(ConfigError, match="need images"):
        make_augment(OmegaConf.create({"crop_padding": 4, "hflip": False}), (1, 40))


def test_cached_teacher_logits_equal_live_teacher_logits():
    teacher = build_model(OmegaConf.create({"arch": "mlp", "hidden": [32], "dropout": 0.5}),
                          (10,), 4).double()  # a batch of 50 or of 3: another order
    x = torch.randn(50, 10, dtype=torch.float64)
    cached = CachedLogits(predict_logits(teacher, x, 1000))
    live = LiveTeacher(teacher, lambda: torch.autocast("cpu", enabled=False))
    idx = torch.tensor([3, 17, 42])
    (cached_logits, none), (live_logits, _) = cached(idx, x[idx]), live(idx, x[idx])
    # dropout on would differ by ~1: one forward pass in float64 agrees to ~1e-15
    assert none is None and torch.allclose(cached_logits, live_logits, rtol=0, atol=1e-12)


def test_distillation_with_and_without_cached_logits_gives_the_same_student(tmp_path):
    def distilled(cache_logits):
        cfg = make_config("dataset=synthetic", "dataset.n=300", "teacher=mlp", "repeats=1",
                          "trainer.epochs=1", "progress=false", "teacher.dropout=0.3",
                          f"trainer.cache_teacher_logits={cache_logits}", "trainer.float64=true",
                          f"cache.dir={tmp_path}/cache{cache_logits}")
        pipeline.run(cfg, tmp_path / f"run{cache_logits}")
        return load_checkpoint(tmp_path / f"run{cache_logits}" / "checkpoints" / "distilled.pt")

    # the same logits, computed in other batches: the same student up to rounding
    assert_float64_weights_agree(distilled(True)["model"], distilled(False)["model"])


def test_augmented_images_distill_with_the_teacher_on_the_same_view(tmp_path, monkeypatch):
    cfg = make_config("dataset=digits", "dataset.augment.crop_padding=1",
                      "dataset.augment.hflip=true", "teacher=mlp", "repeats=1",
                      "trainer.epochs=1", "progress=false", f"cache.dir={tmp_path}/cache")
    stages_seen = []
    original = Stages.teacher_targets

    def spy(self, teacher, loss):
        targets = original(self, teacher, loss)
        stages_seen.append(type(targets).__name__)
        return targets

    monkeypatch.setattr(Stages, "teacher_targets", spy)
    rows = pipeline.run(cfg, tmp_path / "run")["rows"]
    assert stages_seen == ["LiveTeacher"] and len(rows) == 3


def test_parallel_jobs_share_the_cores():
    from kdrun.sweep.launch import threads_per_job

    cores = __import__("os").cpu_count()
    assert threads_per_job(OmegaConf.create({"launcher": {"_target_": "basic"}})) is None
    assert threads_per_job(OmegaConf.create({"launcher": {"n_jobs": 1}})) is None
    for n_jobs in (2, -1, 64):
        threads = threads_per_job(OmegaConf.create({"launcher": {"n_jobs": n_jobs}}))
        jobs = cores if n_jobs < 0 else min(n_jobs, cores)
        assert 1 <= threads and threads * jobs <= max(cores, jobs)


class NaNOnStep(DistillationLoss):
    """Cross-entropy, except that the loss of the ``bad``-th call is NaN."""

    needs_teacher = False

    def __init__(self, bad: int):
        super().__init__()
        self.calls, self.bad = 0, bad

    def forward(self, logits, teacher_logits, labels, *features):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls == self.bad else loss


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_nan_loss_stops_with_its_step_or_is_skipped(on_nan):
    from kdrun.errors import TrainingDiverged
    from kdrun.train.fit import fit

    cfg = make_config("dataset=synthetic", "dataset.n=300", "progress=false",
                      f"trainer.on_nan={on_nan}", "trainer.batch_size=50")
    data = pipeline.load_data(cfg.dataset, cfg.split)
    model = build_model(cfg.student, data.input_shape, data.num_classes)
    run = lambda: fit(model, data, NaNOnStep(bad=3), cfg.trainer, stage="scratch",  # noqa: E731
                      epochs=2, seed=0, device=torch.device("cpu"), progress=False)
    if on_nan == "stop":
        with pytest.raises(TrainingDiverged, match=r"scratch stage diverged at epoch 1, step 3"):
            run()
    else:
        result = run()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert result.best_epoch >= 1


def test_epoch_meter_weighs_each_batch_by_its_size_and_finds_the_first_bad_step():
    meter = EpochMeter(5, "cpu")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    meter.add(1, torch.tensor(1.0), logits[:2], torch.tensor([0, 0]))  # 1 of 2 right
    meter.add(3, torch.tensor(4.0), logits[2:], torch.tensor([0]))  # 1 of 1 right; 2 skipped
    loss, acc, first_bad = meter.result()
    assert loss == pytest.approx((1.0 * 2 + 4.0 * 1) / 3)
    assert acc == pytest.approx(200 / 3) and first_bad == 0
    meter.add(5, torch.tensor(float("nan")), logits[:1], torch.tensor([0]))
    meter.add(4, torch.tensor(float("inf")), logits[:1], torch.tensor([0]))
    assert meter.result()[2] == 4


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizer_is_used_on_cpu_where_torch_has_it_and_matches_the_plain_one(optimizer):
    tcfg = OmegaConf.create({"optimizer": optimizer, "lr": 0.1, "momentum": 0.9,
                             "weight_decay": 0.01, "fused_optimizer": True})
    weights = {}
    for fused in (True, False):  # one kernel or a loop per tensor: compared in float64
        torch.manual_seed(0)
        net = torch.nn.Linear(5, 3).double()
        opt = make_optimizer(net.parameters(), OmegaConf.merge(tcfg, {"fused_optimizer": fused}),
                             torch.device("cpu"))
        has_cpu_kernel = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
        assert opt.defaults.get("fused") is (True if fused and has_cpu_kernel else None)
        for _ in range(3):
            opt.zero_grad()
            net(torch.ones(4, 5, dtype=torch.float64)).square().sum().backward()
            opt.step()
        weights[fused] = net.weight.detach()
    torch.testing.assert_close(weights[True], weights[False], rtol=0, atol=FLOAT64_WEIGHT_BOUND)
    assert not torch.equal(weights[True], torch.nn.Linear(5, 3).weight.double())  # it trained


@pytest.mark.parametrize("loss", ["fitnet", "rkd"])
def test_cached_teacher_features_train_the_student_the_live_teacher_trains(tmp_path, monkeypatch,
                                                                         loss):
    """Without augmentation a feature or relation loss reads the teacher's features
    computed once, as its logits are; the same student up to rounding (in float64) as
    with the teacher run on every batch (trainer.cache_teacher_features_mb=0)."""
    seen = []
    original = Stages.teacher_targets

    def spy(self, teacher, loss_fn):
        targets = original(self, teacher, loss_fn)
        cached = getattr(targets, "features", None) is not None
        seen.append("cached features" if cached else type(targets).__name__)
        return targets

    monkeypatch.setattr(Stages, "teacher_targets", spy)

    def distilled(megabytes):
        cfg = make_config("dataset=synthetic", "dataset.n=300", "teacher=mlp", "repeats=1",
                          "trainer.epochs=2", "progress=false", f"loss={loss}",
                          "trainer.float64=true", f"cache.dir={tmp_path}/cache{megabytes}",
                          f"trainer.cache_teacher_features_mb={megabytes}")
        pipeline.run(cfg, tmp_path / f"run{megabytes}")
        return load_checkpoint(tmp_path / f"run{megabytes}" / "checkpoints" / "distilled.pt")

    cached, live = distilled(1024)["model"], distilled(0)["model"]
    assert seen == ["cached features", "LiveTeacher"]
    assert list((tmp_path / "cache1024").glob("*/features-penultimate-best_val.pt"))
    assert_float64_weights_agree(cached, live)
