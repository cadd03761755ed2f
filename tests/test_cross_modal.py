"""Cross-modal distillation (paired views): each student row keeps its teacher's input,
the teacher trains on its own view with every label, its cached targets are computed on
its view of the student's rows; paired folders; what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kdrun.data import load_data
from kdrun.data.crossmodal import paired_folders, plot
from kdrun.errors import ConfigError, DataError
from kdrun.models import build_model
from kdrun.run import pipeline
from kdrun.store.files import load_checkpoint, load_sealed
from tests.helpers import QUICK_LATENCY, make_config, run_then_rerun

VIEWS = ["dataset=mnist1d_views", "dataset.num_samples=600", "split.standardize=false",
         "split.labeled=50"]


def test_plot_lights_the_row_of_each_value():
    signal = torch.tensor([[[-3.0, 0.0, 3.0, 9.0, -1.5]]])
    picture = plot(signal, height=5)  # rows: values 3, 1.5, 0, -1.5, -3
    assert picture.shape == (1, 1, 5, 5)
    lit = picture[0, 0].argmax(0).tolist()
    assert lit == [4, 2, 0, 0, 3] and picture.sum() == 5


def test_every_student_row_carries_its_teachers_view_of_the_same_example():
    cfg = make_config(*VIEWS)
    data = load_data(cfg.dataset, cfg.split)
    for split in (data.train, data.val, data.test, data.transfer):
        assert torch.equal(plot(split.other, 12), split.x)  # the same example, row by row
    assert len(data.train) + len(data.val) == 50  # the students' budget
    assert len(data.transfer) == 480 - 50
    teacher = data.teacher_data  # its view, every training label
    assert len(teacher.train) + len(teacher.val) == 480 and teacher.input_shape == (1, 40)
    assert teacher.transfer is None
    swapped = load_data(make_config(*VIEWS, "dataset.teacher_view=plot",
                                    "dataset.student_view=signal").dataset, cfg.split)
    assert swapped.input_shape == (1, 40) and swapped.teacher_input_shape == (1, 12, 40)


def write_pairs(root: Path, n: int = 5, unpaired: str | None = None) -> None:
    """Two views of n images per class, the image's number written in its pixels (red in
    rgb, grey in depth, extensions differing) so a test can see which met which."""
    for c in range(2):
        for i in range(n):
            number = 10 * c + i
            for view, ext, colour in (("rgb", "png", (number * 10, 0, 0)),
                                      ("depth", "bmp", (number * 10,) * 3)):
                folder = root / view / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (6, 6), colour).save(folder / f"{i:03d}.{ext}")
    if unpaired:
        Image.new("RGB", (6, 6)).save(root / unpaired)


def test_paired_folders_pair_by_path_without_extension(tmp_path):
    write_pairs(tmp_path)
    raw = paired_folders(str(tmp_path), "rgb", "depth", image_size=4, test_fraction=0.2)
    assert raw.num_classes == 2 and len(raw.x_train) == 8 and len(raw.x_test) == 2
    for x, other, y in ((raw.x_train, raw.pair.x_train, raw.y_train),
                        (raw.x_test, raw.pair.x_test, raw.y_test)):
        assert torch.equal(x[:, 1], x[:, 0])  # depth: grey
        assert torch.equal(x[:, 0], other[:, 0]) and other[:, 1].abs().sum() == 0  # rgb: red
        assert torch.equal(y, (x[:, 0, 0, 0] * 255 / 10).round().long() // 10)


@pytest.mark.parametrize("unpaired,words", [
    ("depth/class1/007.bmp", ["depth/class1/007.bmp has no pair", "rgb"]),
    ("rgb/class0/extra.png", ["rgb/class0/extra.png has no pair", "depth"]),
])
def test_an_unpaired_file_is_one_line_naming_it(tmp_path, unpaired, words):
    write_pairs(tmp_path, unpaired=unpaired)
    with pytest.raises(DataError) as error:
        paired_folders(str(tmp_path), "rgb", "depth")
    assert all(w in str(error.value) for w in words) and "\n" not in str(error.value)


def test_a_view_folder_that_is_not_there(tmp_path):
    write_pairs(tmp_path)
    with pytest.raises(DataError, match="dataset.student_view='ir'.*the views there: depth, rgb"):
        paired_folders(str(tmp_path), "rgb", "ir")


RUN = ["experiment=cross_modal", "progress=false", "repeats=1", "num_threads=1",
       "trainer.epochs=2", "dataset.num_samples=600", "split.labeled=50", *QUICK_LATENCY]


def test_cross_modal_run_caches_targets_on_the_teachers_view_and_reuses_every_stage(tmp_path):
    # float64: the cache's batches and one pass over all rows differ only in rounding,
    # ~1e-16 relative on logits of order 10; 1e-10 is 10^5 above that and far below what
    # the wrong view or the wrong rows would move (~1)
    rows, result = run_then_rerun(tmp_path, *RUN, "trainer.float64=true")
    assert rows.loc["teacher", "view"] == "signal" and rows.loc["distilled", "view"] == "plot"
    assert "on signal" in result["table"] and "on plot" in result["table"]
    assert "the teacher learns from 432 labelled examples of its view" in result["table"]
    # the cached targets are the teacher's outputs on its view of each distilled row
    entry = tmp_path / "cache" / rows.loc["teacher", "cache_key"]
    cached = load_sealed(next(entry.glob("logits-best_val-transfer-*.pt")))
    cfg = make_config(*RUN)
    data = load_data(cfg.dataset, cfg.split)
    teacher = build_model(cfg.teacher, (1, 40), 10).double()
    teacher.load_state_dict(load_checkpoint(tmp_path / "a" / "checkpoints" / "teacher.pt")
                            ["best_model"])
    with torch.no_grad():
        expected = teacher.eval()(data.distill_train().other.double())
    assert cached.dtype == torch.float64
    assert cached.shape == (len(data.train) + len(data.transfer), 10)
    assert (cached - expected).abs().max() < 1e-10


@pytest.mark.parametrize("override,words", [
    ("scheme=dml", "only scheme=offline distils across them"),
    ("trainer.cache_teacher_logits=false", "computed once on its view"),
])
def test_what_cannot_cross_views_is_refused(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        pipeline.run(make_config(*RUN, override, f"cache.dir={tmp_path}/c"), tmp_path / "a")
