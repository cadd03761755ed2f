"""The sweep report's figures, for whatever keys a sweep varies:

- two numeric swept keys (``loss.T`` x ``loss.alpha``, ``split.labeled`` x
  ``dataset.unlabeled``, ...): ``gain_heatmap.png``, one panel per combination of the
  other swept keys;
- one numeric key, or more than two: ``gain_vs_<key>.png``, the gain with its 95%
  interval against each numeric key, one line per combination of the other keys;
- none (``loss=kd,dkd,fitnet``): ``gain_by_setting.png``, every setting's gain with its
  interval;
- ``curves.png``: the validation metric per epoch of the best setting's teacher, scratch
  and distilled students, titled with that setting.

Titles and legends name settings by their swept keys, never by a data hash.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdrun.data.metrics import ACCURACY, Metric
from kdrun.store.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, **options) -> None:
    """``fig`` as a PNG at ``path``, written atomically (a full disk: one line), then closed."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, **options))
    finally:
        _pyplot().close(fig)


def numeric_keys(table: pd.DataFrame, swept: list[str]) -> list[str]:
    """The swept keys whose every value is a number."""
    return [k for k in swept if pd.api.types.is_numeric_dtype(table[k])]


def plot_gains(table: pd.DataFrame, swept: list[str], folder: Path,
               metric: Metric = ACCURACY) -> list[Path]:
    """The figure that fits the swept keys (see the module's docstring); none for a sweep
    of one setting. ``swept``: the keys that tell the table's settings apart (with any
    condition, such as the torch version, that differs within a combination of them)."""
    if len(table) < 2:
        return []
    numeric = numeric_keys(table, swept)
    label = f"gain, test {metric.name} points (95% CI)"
    if len(numeric) == 2:
        return [plot_heatmaps(table, swept, numeric, folder / "gain_heatmap.png", metric)]
    if numeric:
        return [plot_gain_against(table, swept, key, folder / f"gain_vs_{key}.png", label)
                for key in numeric]
    return [plot_gain_by_setting(table, swept, folder / "gain_by_setting.png", label)]


def short_value(value):
    """A swept value as typed: 100.0 -> "100", 0.5 -> "0.5"; anything else unchanged."""
    return f"{value:g}" if isinstance(value, float) and value == value else value


def setting_name(keys: list[str], values, sep: str = ", ") -> str:
    """``loss.T=4, loss.alpha=0.9``: numbers as short as they go, nothing for no keys."""
    values = values if isinstance(values, tuple) else (values,)
    return sep.join(f"{k}={short_value(v)}" for k, v in zip(keys, values))


def _groups(table: pd.DataFrame, keys: list[str]):
    """(name, rows) per combination of ``keys``; one group, unnamed, without keys."""
    if not keys:
        return [("", table)]
    return [(setting_name(keys, values), rows)
            for values, rows in table.groupby(keys, dropna=False, sort=True)]


def plot_heatmaps(table: pd.DataFrame, swept: list[str], axes_keys: list[str],
                  path: Path, metric: Metric = ACCURACY) -> Path:
    """The mean gain over the two numeric keys, one panel per combination of the other
    swept keys, each cell annotated with mean ± std ("ns": not significant)."""
    rows_key, columns_key = axes_keys
    others = [k for k in swept if k not in axes_keys]
    panels = _groups(table, others)
    plt = _pyplot()
    limit = max(float(table.gain.abs().max()), 1e-9)
    n_rows, n_columns = table[rows_key].nunique(), table[columns_key].nunique()
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(max(3.6, 1.8 + 1.3 * n_columns) * len(panels),
                                      2.0 + 0.8 * n_rows))
    for i, (ax, (name, panel)) in enumerate(zip(axes[0], panels)):
        image = _heatmap_panel(ax, panel, rows_key, columns_key, limit, name or "all jobs",
                               metric.higher_is_better)
        ax.set_ylabel(rows_key if i == 0 else "")
    fig.colorbar(image, ax=list(axes[0]))
    fig.suptitle(f"distillation gain, test {metric.name} points (ns: not significant)",
                 fontsize=9)
    save_figure(fig, path, bbox_inches="tight")
    return path


def _heatmap_panel(ax, table: pd.DataFrame, rows_key: str, columns_key: str, limit: float,
                   title: str, higher_is_better: bool = True):
    gain, std, verdict = (table.pivot_table(index=rows_key, columns=columns_key, values=v,
                                            aggfunc="first", dropna=False)
                          for v in ("gain", "gain_std", "verdict"))
    image = ax.imshow(gain.values.astype(float), cmap="RdBu" if higher_is_better else "RdBu_r",
                      vmin=-limit, vmax=limit, aspect="auto")  # blue: distillation helps
    for i in range(gain.shape[0]):
        for j in range(gain.shape[1]):
            if pd.isna(gain.iloc[i, j]):
                continue
            s = std.iloc[i, j]
            mark = "" if verdict.iloc[i, j] in ("helps", "hurts") else "\n(ns)"
            text = f"{gain.iloc[i, j]:+.2f}" + ("" if pd.isna(s) else f"\n±{s:.2f}") + mark
            dark = abs(gain.iloc[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(gain.shape[1]), [f"{c:g}" for c in gain.columns])
    ax.set_yticks(range(gain.shape[0]), [f"{r:g}" for r in gain.index])
    ax.set_xlabel(columns_key)
    ax.set_title(title, fontsize=8)
    return image


def _interval(rows: pd.DataFrame) -> list:
    """Error bars from the gain to its 95% interval's ends (0 where there is none)."""
    return [(rows.gain - rows.gain_ci_low).fillna(0), (rows.gain_ci_high - rows.gain).fillna(0)]


def plot_gain_against(table: pd.DataFrame, swept: list[str], key: str, path: Path,
                      label: str) -> Path:
    """The gain with its 95% interval against ``key``, one line per combination of the
    other swept keys."""
    plt = _pyplot()
    others = [k for k in swept if k != key]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, line in _groups(table, others):
        line = line.sort_values(key)
        ax.errorbar(line[key], line.gain, yerr=_interval(line), marker="o", capsize=3,
                    label=name or None)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    if others:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"distillation gain against {key}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_gain_by_setting(table: pd.DataFrame, swept: list[str], path: Path, label: str) -> Path:
    """Every setting's gain with its 95% interval, one row each, in the report's order."""
    plt = _pyplot()
    names = [setting_name(swept, tuple(row[k] for k in swept)) or f"setting {i + 1}"
             for i, (_, row) in enumerate(table.iterrows())]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.4 * len(table)))
    positions = list(range(len(table)))[::-1]  # the first setting on top
    ax.errorbar(table.gain, positions, xerr=_interval(table), fmt="o", capsize=3)
    ax.set_yticks(positions, names, fontsize=8)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("distillation gain per setting", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_curves(metrics: pd.DataFrame, best: pd.Series | None, swept: list[str],
                path: Path, metric: Metric = ACCURACY) -> Path:
    """Validation metric per epoch: teacher, scratch, and the best distilled setting
    (the jobs of that setting; all jobs when there is no validation split to choose by),
    each a mean over that setting's seeds, titled with the setting."""
    plt = _pyplot()
    val = metrics[metrics.split == "val"]
    jobs = set(best["jobs"]) if best is not None else set(val.job)
    chosen = val[val.job.isin(jobs)]
    curves = {"teacher": chosen[chosen.stage == "teacher"],
              "scratch": chosen[chosen.stage == "scratch"],
              "distilled": chosen[chosen.stage == "distilled"]}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        mean = rows.groupby("epoch").score.mean()
        seeds = rows.seed.nunique() if "seed" in rows else 1
        ax.plot(mean.index, mean.values, label=f"{label} (mean of {seeds} seeds)"
                if seeds > 1 else label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"validation {metric.name} ({metric.unit})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_curves_title(best, swept, metric), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _curves_title(best: pd.Series | None, swept: list[str], metric: Metric = ACCURACY) -> str:
    if best is None:
        return (f"validation {metric.name} per epoch, every job (no validation split to choose "
                f"by)")
    setting = setting_name(swept, tuple(best[k] for k in swept)) or "the sweep's one setting"
    teachers = f"{best.teachers} teacher{'s' if best.teachers > 1 else ''}"
    labels = f", {best.labelled:,.0f} labels" if "labelled" in best and pd.notna(
        best.get("labelled")) else ""
    return f"best setting on validation: {setting}\n({teachers}{labels})"
