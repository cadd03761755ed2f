"""Config validation: each bad value is named with its key and what would be valid."""

from pathlib import Path

import pytest

from kdrun.errors import ConfigError
from kdrun.run.validate import validate
from tests.helpers import make_config

BAD = [
    # override, key named in the message, words of what is valid
    ("loss.T=0", "loss.T", "> 0"),
    ("loss.T=-2", "loss.T", "> 0"),
    ("loss.T=hot", "loss.T", "must be a number"),
    ("loss.alpha=2", "loss.alpha", "<= 1"),
    ("loss.alpha=-0.1", "loss.alpha", ">= 0"),
    ("loss.t2_scale=maybe", "loss.t2_scale", "true or false"),
    ("trainer.epochs=0", "trainer.epochs", ">= 1"),
    ("trainer.epochs=1.5", "trainer.epochs", "integer"),
    ("trainer.batch_size=0", "trainer.batch_size", ">= 1"),
    ("trainer.lr=0", "trainer.lr", "> 0"),
    ("trainer.optimizer=adagrad", "trainer.optimizer", "adam, adamw, sgd"),
    ("trainer.schedule=exponential", "trainer.schedule", "none, cosine, linear, step"),
    ("trainer.grad_clip=-1", "trainer.grad_clip", "> 0"),
    ("trainer.distill_from=first", "trainer.distill_from", "best_val, last"),
    ("split.val_fraction=1", "split.val_fraction", "< 1"),
    ("split.max_train=0", "split.max_train", ">= 1"),
    ("repeats=0", "repeats", ">= 1"),
    ("device=tpu", "device", "auto, cpu, cuda"),
    ("seed=abc", "seed", "integer"),
    ("student.hidden=[0]", "student.hidden", "positive integers"),
    ("student.dropout=1", "student.dropout", "< 1"),
    ("teacher.pool=median", "teacher.pool", "none, max, avg"),
    ("teacher.arch=transformer", "teacher.arch",
     "cnn, dsconv, gcn, hf_cls, hf_lm, linear, mlp, resnet110"),
    ("+teacher.width=3", "teacher.width", "valid: channels"),
    ("+dataset.colour=1", "dataset.colour", "valid: num_samples, seed"),
    ("loss=dkd loss.dkd_beta=-1", "loss.dkd_beta", ">= 0"),
    ("scheme=dml scheme.students=1", "scheme.students", ">= 2"),
    ("scheme=ensemble scheme.combine=median", "scheme.combine", "arithmetic, geometric"),
    ("student.arch=cohort", "student.arch",
     "cnn, dsconv, gcn, hf_cls, hf_lm, linear, mlp, resnet110"),
]


@pytest.mark.parametrize("override,key,valid", BAD)
def test_bad_values_name_the_key_and_what_is_valid(override, key, valid):
    with pytest.raises(ConfigError) as e:
        validate(make_config(*override.split()))
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}=") and valid in str(e.value)
    assert "\n" not in str(e.value)


# every option shipped in configs/<group>/, each composed on top of the defaults; an
# option that needs another to be valid names it here
NEEDS = {"loss=at": ("student=cnn",)}
SHIPPED = [f"{group.name}={option.stem}"
           for group in sorted(Path(__file__).parents[1].joinpath("configs").iterdir())
           if group.name in ("dataset", "teacher", "student", "loss", "scheme", "experiment",
                             "logger", "trainer")
           for option in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("option", SHIPPED)
def test_every_shipped_option_is_valid(option):
    validate(make_config(option, *NEEDS.get(option, ())))
