"""What one run prints, and its summary.csv: the comparison table with its noise verdict
(the statistics: kdrun/report/statistics.py; the logs written while training:
kdrun/report/logs.py; sweeps: kdrun/sweep/report.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from kdrun.data.metrics import ACCURACY, Metric, metric_named
from kdrun.models.quantize import INT8_SUFFIXES
from kdrun.report.measure import BATCHES, TRIES
from kdrun.report.statistics import gain_test, gain_verdict, paired_gain
from kdrun.store.files import atomic_write

SUMMARY_COLUMNS = [
    "role", "seed", "arch", "params", "size_mb", "latency_ms_b1", "latency_ms_b256", "epochs",
    "best_epoch", "val_metric_best", "test_metric_last", "test_metric_best_val", "eval_split",
    "selected_by", "train_seconds", "device", "precision", "torch", "data_sha256",
    "checkpoint", "metric", "higher_is_better",
]


def write_summary(path: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    return df


# ---------------------------------------------------------------- printed table


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def comparison_table(summary: pd.DataFrame, header: str, teacher: str | None = None,
                     draw: str | None = None) -> str:
    """Teacher / scratch / distilled rows with params and accuracies, then the gain with
    what its verdict holds for (``teacher``, ``draw``: see gain_verdict)."""
    split = summary.eval_split.iloc[0]  # "test", or "train" when the labels are random
    selected = summary.selected_by.iloc[0] if "selected_by" in summary else "val"
    chosen = "best val" if selected == "val" else "last ep."
    metric = summary_metric(summary)
    int8 = summary.role.str.endswith(INT8_SUFFIXES)
    if "view" in summary and summary.view.notna().all():  # paired views: what each model read
        summary = summary.assign(arch=summary.arch + " on " + summary.view.astype(str))
    w = max(17, *(len(a) + (len(" distilled") if q else 0) for a, q in zip(summary.arch, int8)))
    p = max(9, *(len(f"{n:,}") for n in summary.params))  # params' width
    lines = [header, *_data_line(summary), f"{'role':<10} {'model':<{w}} {'params':>{p}}  "
                     f"{f'{split} {metric.short}, last':>16}  "
                     f"{f'{split} {metric.short}, {chosen}':>18}"]
    by_role = {role: summary[summary.role == role] for role in ("teacher", "scratch", "distilled")}
    data_free = is_data_free(by_role["distilled"])
    for role, rows in by_role.items():
        if rows.empty:  # e.g. no teacher in deep mutual learning
            continue
        label = "data-free" if role == "distilled" and data_free else role
        lines.append(_row_line(label, rows.arch.iloc[0], rows, w, p))
    scratch, distilled = by_role["scratch"], by_role["distilled"]
    lines += _gain_lines("gain", f"{'data-free' if data_free else 'distilled'}-scratch", "gain",
                         scratch, distilled, w, p, chosen, teacher, draw, metric)
    lines += _all_labels_lines(summary[summary.role == "all_labels"], scratch, distilled, w, p)
    lines += _int8_lines(summary, w, p, chosen, teacher, draw, metric)
    if selected != "val":
        lines.append("no validation split (split.val_fraction=0): every model is taken at its "
                     "last epoch")
    if "compression" in distilled and distilled.compression.notna().all():
        lines.append(_speed_line(distilled.iloc[0]))
    if "train_tokens_per_s" in summary and summary.train_tokens_per_s.notna().any():
        lines.append(_token_speed_line(by_role))
    return "\n".join(lines)


INT8_ROWS = (("int8 PTQ", "scratch_ptq", "distilled_ptq"),
             ("int8 QAT", "scratch_qat", "distilled_qat"))


def _int8_lines(summary: pd.DataFrame, w: int, p: int, chosen: str, teacher: str | None,
                draw: str | None, metric: Metric) -> list[str]:
    """The int8 students (student.quantize=int8): quantised after training (PTQ) and
    trained quantisation-aware (QAT), scratch and distilled, each evaluated as int8; the
    gain of QAT distillation over QAT scratch under the paired test; size and speed."""
    lines = []
    for label, *roles in INT8_ROWS:
        for role in roles:
            rows = summary[summary.role == role]
            if rows.empty:
                return []
            lines.append(_row_line(label, f"{rows.arch.iloc[0]} {role.split('_')[0]}", rows, w, p))
    scratch, distilled = (summary[summary.role == role] for role in INT8_ROWS[1][1:])
    lines += _gain_lines("gain int8", "QAT distilled-QAT scratch", "gain int8 QAT", scratch,
                         distilled, w, p, chosen, teacher, draw, metric)
    return lines + _int8_size_line(summary, distilled.iloc[0])


def _row_line(label: str, model: str, rows: pd.DataFrame, w: int, p: int) -> str:
    """One row of the table: the mean ± std over seeds of the last and the selected epoch."""
    return (f"{label:<10} {model:<{w}} {rows.params.iloc[0]:>{p},}  "
            f"{mean_std(list(rows.test_metric_last)):>16}  "
            f"{mean_std(list(rows.test_metric_best_val)):>18}")


def _gain_lines(label: str, what: str, verdict: str, scratch: pd.DataFrame,
                distilled: pd.DataFrame, w: int, p: int, chosen: str, teacher: str | None,
                draw: str | None, metric: Metric) -> list[str]:
    """The paired gain of distilled over scratch students, and its verdict."""
    gains = {col: list(paired_gain(scratch, distilled, col))
             for col in ("test_metric_last", "test_metric_best_val")}
    return [f"{label:<10} {what:<{w + p + 1}}  {_signed(gains['test_metric_last']):>16}  "
            f"{_signed(gains['test_metric_best_val']):>18}",
            f"{verdict} ({chosen}): "
            f"{gain_verdict(gains['test_metric_best_val'], teacher, draw, metric)}"]


def _int8_size_line(summary: pd.DataFrame, int8) -> list[str]:
    """The int8 student's size and latency against the float32 student's and the
    teacher's, timed side by side in this process."""
    if "latency_ms_b1" not in summary or pd.isna(int8.get("latency_ms_b1")):
        return []
    student = summary[summary.role == "distilled"].iloc[0]
    teacher = summary[summary.role == "teacher"]
    who = [("int8 student", int8), ("float32 student", student),
           *([("teacher", teacher.iloc[0])] if not teacher.empty else [])]
    latency = "; ".join(f"{name} {row.latency_ms_b1:.3g} / {row.latency_ms_b256:.3g} ms"
                        for name, row in who)
    return [f"int8 student: {int8.size_mb:.3f} MB on disk, {student.size_mb / int8.size_mb:.1f}x "
            f"smaller than float32's {student.size_mb:.3f} MB; CPU latency at batch 1 / 256: "
            f"{latency} (medians, timed side by side now)"]


def _token_speed_line(by_role: dict[str, pd.DataFrame]) -> str:
    """A language model's stages: training tokens per second, the median over seeds."""
    speeds = [f"{role} {rows.train_tokens_per_s.median():,.0f}" for role, rows in by_role.items()
              if not rows.empty and rows.train_tokens_per_s.notna().any()]
    return f"training tokens per second (median over seeds): {', '.join(speeds)}"


def _speed_line(row) -> str:
    """Compression and the side-by-side speed-ups; a speed-up whose timing rounds
    disagreed (a busy machine) is not printed as a figure."""
    busy = [b for b in BATCHES if row.get(f"speedup_b{b}_reliable", True) in (False, "False")]
    speeds = ", ".join(_faster(row[f"speedup_b{b}"], b) for b in BATCHES if b not in busy)
    ratio = row.compression  # the teacher's parameters over the student's
    text = (f"student vs teacher: {ratio:.2f}x fewer parameters" if ratio >= 1 else
            f"student vs teacher: {1 / ratio:.2f}x more parameters")
    if speeds:
        text += f", {speeds}, timed side by side now"
    if busy:
        text += (f"; speed-up at batch {' and '.join(map(str, busy))} not measured: the "
                 f"machine was busy (its timing rounds disagreed, {TRIES} tries); run again "
                 f"on a quiet machine")
    return text + f" ({row.size_mb:.3f} MB on disk)"


def _faster(speedup: float, batch: int) -> str:
    """A speed-up in words: faster, or slower for a student that takes longer."""
    if speedup >= 1:
        return f"{speedup:g}x {'faster ' if batch == 1 else ''}at batch {batch}"
    return f"{1 / speedup:.3g}x slower at batch {batch}"


def one_line(summary: pd.DataFrame) -> str:
    """A run in one line, for a sweep's console: the distilled students' test metric
    (best-validation epoch) and their paired gain with its interval and verdict."""
    scratch, distilled = (summary[summary.role == role] for role in ("scratch", "distilled"))
    if scratch.empty or distilled.empty:
        return "finished"
    gains = list(paired_gain(scratch, distilled, "test_metric_best_val"))
    test = gain_test(gains, summary_metric(summary))
    interval = f" [{test.ci_low:+.2f}, {test.ci_high:+.2f}]" if test.n > 1 else ""
    return (f"distilled {mean_std(list(distilled.test_metric_best_val))}, gain {test.mean:+.2f}"
            f"{interval}: {test.verdict}")


def summary_metric(summary: pd.DataFrame) -> Metric:
    """The metric a summary's ``acc`` columns hold (its ``metric`` column; accuracy in a
    summary written before there was one)."""
    if "metric" not in summary:
        return ACCURACY
    direction = summary.higher_is_better.iloc[0] if "higher_is_better" in summary else None
    return metric_named(summary.metric.iloc[0], direction)


def markdown_table(df: pd.DataFrame) -> str:
    cells = df.astype(object).where(df.notna(), "-").astype(str)  # a key a method lacks: "-"
    rows = [list(df.columns), ["---"] * len(df.columns)] + cells.values.tolist()
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)


def is_data_free(distilled: pd.DataFrame) -> bool:
    """Whether the distilled rows are data-free students (scheme=data_free): they
    learned from generated inputs only."""
    return (not distilled.empty and "train_generated" in distilled
            and bool(distilled.train_generated.notna().all()))


def _data_line(summary: pd.DataFrame) -> list[str]:
    """What each student learned from, when the distilled one had a transfer set or
    none at all (data-free)."""
    distilled = summary[summary.role == "distilled"]
    if is_data_free(distilled):
        return _data_free_line(summary, distilled.iloc[0])
    if "train_unlabeled" not in distilled or not (distilled.train_unlabeled > 0).any():
        return []
    row = distilled.iloc[0]
    teacher = summary[summary.role == "teacher"]
    own = (teacher.train_labeled.iloc[0] if not teacher.empty and "train_labeled" in teacher
           else row.train_labeled)
    who = ("teacher and scratch student learn from the labelled examples"
           if own == row.train_labeled else f"the teacher learns from {own:,.0f} labelled "
           "examples of its view, the scratch student from the labelled ones")
    return [f"data: labelled {row.train_labeled:,.0f} (+ {row.val_examples:,.0f} validation) · "
            f"unlabelled {row.train_unlabeled:,.0f}: {who}, the distilled student from both "
            f"(labels on the labelled ones only)"]


def _data_free_line(summary: pd.DataFrame, student) -> list[str]:
    """Examples seen: 0 for the data-free student; what the others learned from."""
    seen = {role: summary[summary.role == role] for role in ("teacher", "scratch")}
    learned = "; ".join(f"{role} {rows.train_labeled.iloc[0]:,.0f} labelled (+ "
                        f"{rows.val_examples.iloc[0]:,.0f} validation)"
                        for role, rows in seen.items()
                        if not rows.empty and "train_labeled" in rows
                        and rows.train_labeled.notna().all())
    return [f"data: examples seen by the data-free student: 0 (no training, unlabelled or "
            f"validation example, no label); it learned from {student.train_generated:,.0f} "
            f"generated inputs and the teacher's outputs on them, and is taken at its last "
            f"epoch" + (f" · {learned}" if learned else "")]


def _all_labels_lines(reference: pd.DataFrame, scratch: pd.DataFrame, distilled: pd.DataFrame,
                      w: int, p: int) -> list[str]:
    """The "scratch, all labels" reference row (the student trained from scratch on the
    transfer set's true labels too), and how much of the gap to it distillation closed."""
    if reference.empty:
        return []
    arch = f"{reference.arch.iloc[0]}, all labels"
    lines = [f"{'reference':<10} {arch:<{w}} {reference.params.iloc[0]:>{p},}  "
             f"{mean_std(list(reference.test_metric_last)):>16}  "
             f"{mean_std(list(reference.test_metric_best_val)):>18}"]
    gap = (statistics.mean(reference.test_metric_best_val)
           - statistics.mean(scratch.test_metric_best_val))
    closed = (statistics.mean(distilled.test_metric_best_val)
              - statistics.mean(scratch.test_metric_best_val))
    share = f"{closed / gap:.0%}" if gap > 0 else "n/a (no gap)"
    lines.append(f"reference: the student from scratch on every label, the transfer set's "
                 f"included (not a contender: those labels are what distillation does without); "
                 f"distillation closes {share} of the scratch-to-reference gap of {gap:+.2f}")
    return lines


def _signed(values: list[float]) -> str:
    text = mean_std(values)
    return text if text.startswith("-") else "+" + text
