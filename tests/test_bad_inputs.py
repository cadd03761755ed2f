"""Every kind of user mistake, through the command line: exit code 2, one line on
stderr that names what is wrong and what would be valid, no traceback, and no file
the user already had is changed.

The cases run `kdrun.cli.main()` in this process (a subprocess per case would cost
a few seconds each); tests/test_cli.py runs a handful of the same mistakes through
the installed command.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from kdrun import cli
from kdrun.errors import ConfigError
from kdrun.run import pipeline
from tests.helpers import write_mnist

QUICK = ["progress=false", "repeats=1", "trainer.epochs=1", "num_threads=1"]
SYNTHETIC = ["dataset=synthetic", "dataset.n=200", "dataset.dim=10", "teacher=mlp",
             "teacher.hidden=[32]", "student=mlp", "student.hidden=[8]"]


def _checkpoint(tmp: Path, hidden: list[int], dim: int = 10, classes: int = 5) -> Path:
    """A real kdrun-style teacher checkpoint for an mlp of the given shape."""
    from tests.helpers import make_config

    spec = make_config("teacher=mlp", f"teacher.hidden={hidden}").teacher
    path = tmp / f"teacher_{'_'.join(map(str, hidden))}_{classes}.pt"
    torch.save({"model": pipeline.build_model(spec, (dim,), classes).state_dict()}, path)
    return path


class RunsCode:
    """Unpickling this would run code: a weights-only load must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def teacher_file(kind: str):
    def setup(tmp: Path) -> list[str]:
        path = tmp / "teacher.pt"
        if kind == "garbage":
            path.write_bytes(b"this is not a checkpoint")
        elif kind == "truncated":
            data = _checkpoint(tmp, [32]).read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "other_arch":
            path = _checkpoint(tmp, [64])
        elif kind == "other_classes":
            path = _checkpoint(tmp, [32], classes=3)
        elif kind == "runs_code":
            torch.save({"model": RunsCode(tmp / "pwned")}, path)
        elif kind == "a_folder":
            path.mkdir()
        return [*SYNTHETIC, f"teacher.checkpoint={path}"]
    return setup


def mnist_files(problem: str):
    def setup(tmp: Path) -> list[str]:
        if problem == "truncated":
            write_mnist(tmp)
            images = tmp / "MNIST" / "raw" / "train-images-idx3-ubyte"
            images.write_bytes(images.read_bytes()[:5000])
        return ["dataset=mnist", f"dataset.root={tmp}", "student=mlp", "teacher=mlp"]
    return setup


def image_folder(problem: str):
    def setup(tmp: Path) -> list[str]:
        from PIL import Image

        train = tmp / "images" / "train"
        for c in range(2):
            (train / f"class{c}").mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (12, 12), (40 * c, 0, 0)).save(train / f"class{c}" / f"{i}.png")
        if problem == "empty_class":
            (train / "class2").mkdir()
        elif problem == "not_an_image":
            (train / "class1" / "3.png").write_text("hello")
        elif problem == "truncated_image":
            png = train / "class0" / "2.png"
            png.write_bytes(png.read_bytes()[:40])
        elif problem == "no_root":
            return ["dataset=imagefolder", f"dataset.root={tmp}/nowhere"]
        return ["dataset=imagefolder", f"dataset.root={tmp}/images", "dataset.workers=0",
                "dataset.image_size=12", "teacher=cnn", "student=cnn"]
    return setup


def paired_files(tmp: Path) -> list[str]:
    from PIL import Image

    for view in ("rgb", "depth"):
        for c in range(2):
            (tmp / "pairs" / view / f"c{c}").mkdir(parents=True)
            for i in range(4 if view == "rgb" else 3):  # rgb/c*/3.png has no depth twin
                Image.new("RGB", (8, 8), (40 * c, 0, 0)).save(tmp / "pairs" / view / f"c{c}"
                                                              / f"{i}.png")
    return ["dataset=paired_folders", f"dataset.root={tmp}/pairs", "dataset.image_size=8"]


def unwritable_output(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("mine")
    return [f"output_root={tmp}/a_file/runs"]


def args(*overrides: str):
    return lambda tmp: list(overrides)


# (case id, arguments given the test's folder, words the one-line message must contain)
CASES = [
    # config groups, keys and values
    ("unknown dataset", args("dataset=imagenet"), ["dataset='imagenet'", "valid:", "mnist1d"]),
    ("unknown loss", args("loss=kl"), ["loss='kl'", "valid:", "dkd", "kd"]),
    ("unknown experiment", args("experiment=mine"), ["experiment='mine'", "seed_mnist_mlp"]),
    ("unknown key", args("loss.Tx=3"), ["loss has no key 'Tx'", "valid: ", "T, alpha", "+loss.Tx"]),
    ("key added twice", args("+loss.T=3"), ["loss.T"]),
    ("T zero", args("loss.T=0"), ["loss.T=0", "> 0"]),
    ("T not a number", args("loss.T=hot"), ["loss.T='hot'", "must be a number"]),
    ("alpha above 1", args("loss.alpha=1.5"), ["loss.alpha=1.5", "<= 1"]),
    ("alpha negative", args("loss.alpha=-0.1"), ["loss.alpha=-0.1", ">= 0"]),
    ("alpha and term weights both set", args("loss.ce_weight=0.1", "loss.kd_weight=9"),
     ["loss.ce_weight=0.1", "loss.alpha=0.9 already weights the terms", "loss.alpha=null"]),
    ("term weights without alpha, one missing", args("loss.alpha=null", "loss.kd_weight=9"),
     ["loss.ce_weight", "set both loss.ce_weight and loss.kd_weight"]),
    ("CRD negatives misspelt", args("loss=crd", "loss.negatives=others"),
     ["loss.negatives='others'", "other_classes, uniform"]),
    ("epochs zero", args("trainer.epochs=0"), ["trainer.epochs=0", ">= 1"]),
    ("epochs fractional", args("trainer.epochs=2.5"), ["trainer.epochs=2.5", "integer"]),
    ("batch size zero", args("trainer.batch_size=0"), ["trainer.batch_size=0", ">= 1"]),
    ("lr negative", args("trainer.lr=-0.1"), ["trainer.lr=-0.1", "> 0"]),
    ("val fraction 1", args("split.val_fraction=1"), ["split.val_fraction=1", "< 1"]),
    ("unknown optimizer", args("trainer.optimizer=adagrad"), ["adagrad", "adam, adamw, sgd"]),
    ("unknown on_nan", args("trainer.on_nan=ignore"), ["trainer.on_nan='ignore'", "stop, skip"]),
    ("unknown architecture", args("teacher.arch=vit"),
     ["teacher.arch='vit'", "cnn, dsconv, gcn, hf_cls, hf_lm, linear, mlp", "import path"]),
    ("seed not an integer", args("seed=abc"), ["seed='abc'", "integer"]),
    ("repeats zero", args("repeats=0"), ["repeats=0", ">= 1"]),
    ("unknown device", args("device=tpu"), ["device='tpu'", "auto, cpu, cuda"]),
    ("bad point in a sweep", args("-m", "loss.T=1,2,-1"), ["loss.T=-1", "> 0"]),
    ("malformed sweep", args("-m", "loss.T=1,,2"), ["loss.T=1,,2"]),
    ("a ~ the shell leaves as it is", args("dataset=mnist", "dataset.root=~/data"),
     ["dataset.root=~/data", "$HOME"]),
    ("search space names a key the loss lacks", args("hparams_search=kd_optuna", "loss=dkd"),
     ["hydra.sweeper.params", "loss.alpha", "dkd_optuna"]),
    ("feature loss on an mlp", args("loss=at"), ["loss.student_layer", "not a layer"]),
    ("loss weight out of range", args("loss=mse_logits", "loss.beta=3"),
     ["loss.beta=3", "<= 1"]),
    ("key the loss does not take", args("+loss.gamma=2"),
     ["loss.gamma", "not a setting of loss kd", "T, alpha, t2_scale"]),
    ("loss class that does not exist", args("loss.name=mypackage.NoSuchLoss"),
     ["loss.name", "cannot import"]),
    # label budgets and transfer sets
    ("label budget negative", args(*SYNTHETIC, "split.labeled=-5"),
     ["split.labeled=-5", "integer >= 1", "between 0 and 1"]),
    ("label budget over the data", args(*SYNTHETIC, "split.labeled=100000"),
     ["split.labeled=100000", "more than the 160 training examples"]),
    ("label budget under the classes", args(*SYNTHETIC, "split.labeled=3"),
     ["split.labeled=3", "fewer than the 5 classes"]),
    ("unlabelled count negative", args(*SYNTHETIC, "dataset.unlabeled=-1"),
     ["dataset.unlabeled=-1", ">= 0"]),
    ("reference without a transfer set", args(*SYNTHETIC, "all_labels_reference=true"),
     ["all_labels_reference=True", "needs a transfer set"]),
    # the machine and the output folder
    ("CUDA absent", args("device=cuda"), ["device='cuda'", "CUDA is not available", "cpu or auto"]),
    ("output_root not writable", unwritable_output, ["output_root=", "not a writable folder"]),
    # data sets
    ("MNIST absent", mnist_files("absent"), ["MNIST", "train-images-idx3-ubyte",
                                             "download=true"]),
    ("MNIST truncated", mnist_files("truncated"), ["MNIST files in", "truncated or corrupt",
                                                   "train-images-idx3-ubyte"]),
    ("CIFAR-10 absent", args("dataset=cifar10", "dataset.root=/nonexistent"),
     ["cifar-10-batches-py", "download=true"]),
    ("image folder absent", image_folder("no_root"), ["no folder", "nowhere"]),
    ("empty class folder", image_folder("empty_class"), ["class2", "has no images"]),
    ("file that is no image", image_folder("not_an_image"), ["class1/3.png", "unreadable image"]),
    ("truncated image", image_folder("truncated_image"), ["class0/2.png", "unreadable image"]),
    # graphs and paired views
    ("Planetoid files absent", lambda tmp: ["dataset=planetoid", f"dataset.root={tmp}",
                                            "teacher=gcn"],
     ["dataset.root: no file", "ind.cora.x", "point dataset.root at the folder"]),
    ("graph model on data without a graph", args("teacher=gcn"),
     ["teacher.arch='gcn'", "reads a graph", "dataset=csbm"]),
    ("unknown view", args("dataset=mnist1d_views", "dataset.num_samples=200",
                          "dataset.student_view=depth"),
     ["dataset.student_view='depth'", "plot, signal"]),
    ("unpaired file", paired_files, ["rgb/c0/3.png has no pair", "pairs/depth"]),
    # teacher checkpoints
    ("checkpoint missing", args(*SYNTHETIC, "teacher.checkpoint=/no/such/teacher.pt"),
     ["teacher.checkpoint", "no such file"]),
    ("checkpoint garbage", teacher_file("garbage"), ["not a loadable weights-only"]),
    ("checkpoint truncated", teacher_file("truncated"), ["not a loadable weights-only"]),
    ("checkpoint is a folder", teacher_file("a_folder"), ["teacher.checkpoint", "a folder"]),
    ("checkpoint runs code", teacher_file("runs_code"), ["not a loadable weights-only",
                                                         "could run code", "state_dict"]),
    ("checkpoint other width", teacher_file("other_arch"),
     ["fc0.weight", "[64, 10]", "[32, 10]"]),
    ("checkpoint other classes", teacher_file("other_classes"), ["[3, 32]", "[5, 32]"]),
    # numbers
    ("loss becomes NaN", args(*SYNTHETIC, "trainer.lr=1e30", "trainer.optimizer=sgd"),
     ["teacher stage diverged", "epoch 1, step", "trainer.lr", "on_nan=skip"]),
]


def run_kdrun(argv: list[str], cwd: Path, monkeypatch, capfd) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["kdrun", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
        pytest.fail("kdrun returned instead of exiting with an error")
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("setup,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path, monkeypatch, capfd, setup, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on GPU machines
    given = tmp_path / "given"
    given.mkdir()
    argv = setup(given)
    before = _fingerprint(given)
    work = tmp_path / "work"
    work.mkdir()
    overrides = [a for a in argv if a != "-m"]
    if not any(a.startswith("output_root=") for a in argv):
        overrides.append(f"cache.dir={work}/cache")
    argv = (["-m"] if "-m" in argv else []) + QUICK + overrides  # the case's own values win
    code, out, err = run_kdrun(argv, work, monkeypatch, capfd)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: "), err
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert "Traceback" not in out + err
    assert _fingerprint(given) == before  # nothing the user had was changed
    assert not (given / "pwned").exists()


def test_hydra_full_error_shows_the_traceback_instead(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kdrun", "loss.T=0"])
    monkeypatch.setitem(os.environ, "HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="loss.T"):
        cli.main()
