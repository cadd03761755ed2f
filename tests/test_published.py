"""kdrun-report --published: a CIFAR-100 sweep's results beside the papers' figures."""

from __future__ import annotations

import pandas as pd
from omegaconf import OmegaConf

from kdrun.sweep.published import PUBLISHED_CSV, read_published
from kdrun.sweep.report import main as kdrun_report


def fake_cifar_job(sweep, name, method, teacher, student, accs, curves):
    """A finished CIFAR-100 job: ``accs`` = (teacher, [scratch per seed], [distilled per
    seed]) at the best-val epoch; ``curves`` = the distilled test accuracy per epoch, per
    seed."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"loss={method}"]), job / ".hydra" / "overrides.yaml")
    common = {"dataset": "cifar100", "method": method, "T": 4.0, "alpha": 0.9,
              "device": "cpu", "precision": "fp32", "torch": "2.x", "data_sha256": "d",
              "eval_split": "test"}
    rows = [{"role": "teacher", "seed": 0, "arch": teacher, "test_metric_best_val": accs[0],
             "val_metric_best": accs[0], "cache_key": "t", **common}]
    for seed, (s, d) in enumerate(zip(accs[1], accs[2])):
        rows += [{"role": "scratch", "seed": seed, "arch": student, "test_metric_best_val": s,
                  "val_metric_best": s, "cache_key": f"s{seed}", **common},
                 {"role": "distilled", "seed": seed, "arch": student, "test_metric_best_val": d,
                  "val_metric_best": d, "cache_key": f"d{name}{seed}", **common}]
    pd.DataFrame(rows).to_csv(job / "summary.csv", index=False)
    metrics = [{"stage": "distilled", "seed": seed, "epoch": e, "split": split, "score": acc}
               for seed, curve in enumerate(curves) for e, acc in enumerate(curve, start=1)
               for split in ("val", "test")]
    pd.DataFrame(metrics).to_csv(job / "metrics.csv", index=False)


def test_published_table_has_the_issues_reference_figures():
    table = read_published().set_index(["pair", "method"])
    assert table.loc[("resnet32x4_resnet8x4", "kd")][["teacher_acc", "student_acc",
                                                      "distilled_acc"]].tolist() == \
        [79.42, 72.50, 73.33]
    assert table.loc[("wrn_40_2_wrn_16_2", "dkd")].distilled_acc == 76.23  # mdistiller's
    assert table.loc[("resnet32x4_ShuffleV2", "crd")].distilled_acc == 75.65
    assert table.loc[("vgg13_vgg8", "crd")].distilled_acc == 73.94
    assert table.loc[("resnet56_resnet20", "dkd")].source.startswith("mdistiller")


def test_report_puts_a_fake_sweep_beside_the_published_numbers(tmp_path, capsys):
    fake_cifar_job(tmp_path, "a", "kd", "resnet56", "resnet20",
                   (72.0, [69.0, 68.0], [70.0, 71.0]), [[60.0, 70.5, 70.0], [65.0, 71.5, 71.0]])
    fake_cifar_job(tmp_path, "b", "fitnet", "resnet56", "resnet20",  # nothing published
                   (72.0, [69.0, 68.0], [69.5, 70.5]), [[60.0, 69.5], [61.0, 70.5]])
    assert kdrun_report([str(tmp_path), "--published"]) == 0
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Beside the published numbers")[1]
    assert "best test accuracy over epochs" in section and "best-validation epoch" in section
    rows = [line for line in section.splitlines() if line.startswith("| resnet56")]
    assert len(rows) == 1  # fitnet has no published figure
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # teacher 72.00 vs 72.34; scratch mean 68.50 vs 69.06; distilled mean 70.50 vs 70.66;
    # best test epochs 70.5 and 71.5: mean 71.00, 71.00 - 70.66 = +0.34
    assert cells[:9] == ["resnet56 -> resnet20", "kd", "2", "72.00 / 72.34", "68.50 / 69.06",
                         "70.50 / 70.66", "71.00", "+0.34",
                         "RepDistiller README (Tian et al. ICLR 2020)"]


def test_a_bad_published_file_is_one_line(tmp_path, capsys):
    fake_cifar_job(tmp_path, "a", "kd", "resnet56", "resnet20", (72.0, [69.0], [70.0]),
                   [[70.0]])
    bad = tmp_path / "mine.csv"
    bad.write_text("pair,method\nx,kd\n")
    assert kdrun_report([str(tmp_path), "--published", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing columns teacher, student" in err[0]
    assert PUBLISHED_CSV.name == "published.csv"
