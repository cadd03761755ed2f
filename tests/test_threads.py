"""num_threads=auto: small models train on one CPU thread, decided from their forward
pass's cost counted on the meta device (hand-computed here); everything else keeps
torch's default."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.data import load_data
from kdrun.models import forward_mflop
from kdrun.run import pipeline
from tests.helpers import make_config


def test_an_mlps_forward_cost_is_two_flops_per_weight_and_example():
    mlp = OmegaConf.create({"arch": "mlp", "hidden": [100, 100]})
    weights = 40 * 100 + 100 * 100 + 100 * 10
    assert forward_mflop(mlp, (1, 40), 10, batch=64) == pytest.approx(2 * 64 * weights / 1e6)


def test_a_convolutions_cost_counts_every_output_position():
    cnn = OmegaConf.create({"arch": "cnn", "channels": [8], "kernel_size": 5, "stride": 1,
                            "hidden": []})
    conv = 2 * 40 * 8 * 1 * 5  # 40 outputs (padded by k // 2), 8 channels, 1 input, k=5
    head = 2 * 8 * 40 * 3  # the flattened map into 3 classes
    assert forward_mflop(cnn, (1, 40), 3, batch=10) == pytest.approx(10 * (conv + head) / 1e6)


def test_counting_draws_nothing_and_a_pretrained_model_counts_as_unknown():
    state = torch.get_rng_state()
    forward_mflop(OmegaConf.create({"arch": "cnn", "channels": [8], "hidden": [16]}),
                  (1, 40), 10, batch=4)
    assert torch.equal(state, torch.get_rng_state())  # it decides the next model's init
    timm = OmegaConf.create({"arch": "timm", "name": "resnet18", "pretrained": True})
    assert forward_mflop(timm, (3, 32, 32), 10, batch=4) is None  # nothing read, no timm


@pytest.fixture
def two_default_threads(monkeypatch):
    """torch's default taken as 2 threads on a 4-core machine, whatever this one has."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(pipeline, "TORCH_THREADS", 2)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 4)
    yield
    torch.set_num_threads(threads)


def thread_count(*overrides: str, device: str = "cpu") -> int:
    cfg = make_config(*overrides)
    data = load_data(cfg.dataset, cfg.split)
    pipeline.set_threads(cfg, data, torch.device(device))
    return torch.get_num_threads()


def test_auto_trains_the_default_small_pair_on_one_thread(two_default_threads):
    assert make_config().num_threads == "auto"
    assert thread_count() == 1  # teacher 14 MFLOP a batch of 100, student 3
    assert thread_count("one_thread_below_mflop=10") == 2  # the teacher is now too large


def test_auto_keeps_torchs_default_on_a_gpu_and_a_number_is_taken_as_given(two_default_threads):
    assert thread_count(device="cuda") == 2
    assert thread_count("num_threads=3") == 3
    assert thread_count("num_threads=8") == 4  # at most the cores
    assert thread_count("num_threads=null") == 2


def test_before_the_data_is_known_auto_is_one_thread(two_default_threads):
    pipeline.set_threads(make_config())  # the data loads on one thread: auto is exactly 1
    assert torch.get_num_threads() == 1
