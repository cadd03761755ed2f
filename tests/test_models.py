"""Model builders: shapes from the data, named layers, clear errors."""

import pytest
import torch
from omegaconf import OmegaConf

from kdrun.errors import DataError
from kdrun.models import build_model, count_params, describe


def cfg(**kw):
    return OmegaConf.create(kw)


def test_mlp_shapes_and_param_count():
    m = build_model(cfg(arch="mlp", hidden=[20], dropout=0.0), (1, 28, 28), 10)
    assert m(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert count_params(m) == 784 * 20 + 20 + 20 * 10 + 10  # the seed notebook's 784-20-10


def test_mlp_dropout_layers_follow_each_hidden_layer():
    m = build_model(cfg(arch="mlp", hidden=[1200, 1200], dropout=0.5), (784,), 10)
    names = [n for n, _ in m.named_children()]
    assert names == ["flatten", "fc0", "relu0", "drop0", "fc1", "relu1", "drop1", "head"]


@pytest.mark.parametrize("shape", [(1, 40), (3, 32, 32), (1, 8, 8)])
def test_cnn_is_1d_for_sequences_and_2d_for_images(shape):
    m = build_model(cfg(arch="cnn", channels=[8, 8], kernel_size=3, stride=2, hidden=[16]),
                    shape, 7)
    conv = m.conv0
    assert isinstance(conv, torch.nn.Conv1d if len(shape) == 2 else torch.nn.Conv2d)
    assert m(torch.zeros(2, *shape)).shape == (2, 7)


def test_cnn_with_batch_norm_down_to_1x1_maps_builds_and_keeps_other_models_init():
    """kdrun's default CNN (strides 2) on 8x8 digits ends in 1x1 maps: its shape probe,
    one example in training mode, gave batch norm one value per channel (a traceback).
    It now probes that model in eval mode; a model whose probe worked keeps the running
    statistics the training-mode probe leaves (cached stages started from them)."""
    spec = dict(arch="cnn", channels=[32, 32, 32], kernel_size=[5, 3, 3], stride=2,
                batch_norm=True)
    tiny = build_model(cfg(**spec), (1, 8, 8), 10)
    assert tiny.training and tiny(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert tiny.bn0.num_batches_tracked == tiny.bn2.num_batches_tracked == 1  # not the probe
    big = build_model(cfg(**spec), (1, 28, 28), 10)
    assert big.bn0.num_batches_tracked == 1 and big.bn0.running_var.ne(1).any()


def test_mnist1d_cnn_matches_the_papers_size():
    """Greydanus' 25-channel ConvBase has about 5k parameters."""
    m = build_model(cfg(arch="cnn", channels=[25, 25, 25], kernel_size=[5, 3, 3], stride=2),
                    (1, 40), 10)
    assert 5000 <= count_params(m) <= 5300


def test_cnn_with_global_pool_and_pooling():
    m = build_model(cfg(arch="cnn", channels=[4, 4, 4], pool="max", global_pool=2), (3, 28, 28), 10)
    assert m.head.in_features == 4 * 2 * 2


def test_cnn_on_flat_features_is_a_clear_error():
    with pytest.raises(DataError, match="use an mlp"):
        build_model(cfg(arch="cnn", channels=[4]), (50,), 5)


def test_describe():
    assert describe(cfg(arch="mlp", hidden=[100, 100])) == "mlp[100,100]"
    assert describe(cfg(arch="cnn", channels=[32, 32], hidden=[128])) == "cnn[32,32]+fc[128]"


def test_resnet18_takes_channels_and_classes_from_the_data():
    m = build_model(cfg(arch="resnet18", pretrained=False, small_inputs=True), (1, 8, 8), 7)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 7
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


def test_dsconv_is_depthwise_separable():
    m = build_model(cfg(arch="dsconv", base=4, multipliers=[1, 2, 4], pool_blocks=2),
                    (3, 16, 16), 11)
    assert m.dw1.groups == m.dw1.in_channels == 4 and m.pw1.kernel_size == (1, 1)
    assert m.pw2.out_channels == 16 and m(torch.zeros(2, 3, 16, 16)).shape == (2, 11)
    assert describe(cfg(arch="dsconv", base=4)) == "dsconv[4]"


@pytest.mark.parametrize("arch", ["resnet18", "dsconv"])
def test_image_models_refuse_sequences(arch):
    with pytest.raises(DataError, match="needs images"):
        build_model(cfg(arch=arch), (1, 40), 10)
