"""The training-curves figure of one or more run folders, read from their metrics.jsonl (what it shows:
moca_fast.viz.curves, the command's help)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from moca_fast.errors import ConfigError
from moca_fast.figures.figure import TITLE_SIZE, new_figure, set_title

log = logging.getLogger("moca_fast.viz")

METRICS = "metrics.jsonl"
PANELS = (("loss", "loss (0.5 image + 0.5 dense)"), ("loss_img", "image loss (cross-view)"),
          ("loss_loc", "dense loss (same-view)"), ("lr", "learning rate"), ("knn_top1", "k-NN top-1 (%)"))
#: (file, its step's key (None: step 0), its k-NN top-1's key), written by the trainer beside metrics.jsonl
EVALUATION_FILES = (("knn_random_init.json", None, "top1"), ("eval.json", "step", "knn_top1"))
COLUMNS = 3
PANEL_WIDTH, PANEL_HEIGHT = 3.6, 2.6
HEADER = 0.5


@dataclass
class Run:
    """series[key] = ([steps], [values]) of one run."""

    label: str
    folder: Path
    series: dict[str, tuple[list, list]] = field(default_factory=dict)
    skipped_lines: int = 0

    def add(self, key: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)


def _folder(path: str) -> Path:
    p = Path(path)
    folder = p.parent if p.name == METRICS else p
    if not (folder / METRICS).is_file():
        raise ConfigError(f"{path}: no {METRICS} (not a launch/train.py run folder)")
    return folder


def labels(folders: list[Path]) -> list[str]:
    """Each run's name: its folder name, or the path as given when two folders share a name."""
    names = [f.name or str(f) for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


def read_run(folder: Path, label: str) -> Run:
    run = Run(label, folder)
    for line in (folder / METRICS).read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            run.skipped_lines += 1
            continue
        for key, _ in PANELS:
            if isinstance(record.get(key), (int, float)):
                run.add(key, step, float(record[key]))
    for name, step_key, value_key in EVALUATION_FILES:
        path = folder / name
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                run.add("knn_top1", int(record[step_key]) if step_key else 0, float(record[value_key]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                run.skipped_lines += 1
    if "knn_top1" in run.series:  # the evaluations in step order (the periodic ones lie between the two files)
        run.series["knn_top1"] = tuple(map(list, zip(*sorted(zip(*run.series["knn_top1"])))))
    if not run.series:
        raise ConfigError(f"{folder / METRICS}: no metrics records")
    if run.skipped_lines:
        log.warning("%s: skipped %d unreadable records", folder, run.skipped_lines)
    return run


def draw(runs: list[Run]):
    rows = -(-len(PANELS) // COLUMNS)
    fig = new_figure(COLUMNS * PANEL_WIDTH, rows * PANEL_HEIGHT + HEADER)
    set_title(fig, f"Training curves of {len(runs)} run{'s' if len(runs) > 1 else ''}: "
              + ", ".join(str(r.folder) for r in runs))
    axes = list(fig.subplots(rows, COLUMNS, squeeze=False).flat)
    lines = []
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.set_xlabel("optimiser step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        for i, run in enumerate(runs):
            if key in run.series:
                steps, values = run.series[key]
                marker = "o" if key == "knn_top1" or len(steps) < 3 else None
                lines += ax.plot(steps, values, marker=marker, markersize=4, color=f"C{i}", label=run.label)
        if not ax.lines:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    legend_ax = axes[-1] if len(PANELS) % COLUMNS else None
    handles = {line.get_label(): line for line in lines}
    if legend_ax is not None:
        legend_ax.set_axis_off()
        legend_ax.legend(handles=list(handles.values()), loc="center", fontsize=8, title="run", title_fontsize=8)
    else:
        fig.legend(handles=list(handles.values()), loc="outside lower center", fontsize=8)
    return fig


def curves_figure(paths: list[str]):
    folders = [_folder(p) for p in paths]
    return draw([read_run(f, label) for f, label in zip(folders, labels(folders))])
