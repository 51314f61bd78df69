"""Rank-0 logging: periodic text lines, ``summary.csv``, optional TensorBoard, a PNG of the curves."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from pathlib import Path

from widedeep.fileio import atomic_write_bytes

log = logging.getLogger("widedeep.train")


def setup_logging(output_dir: Path | None, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True
    )


class Summary:
    """One CSV row per epoch (timm's ``summary.csv``), rewritten atomically with all rows so far."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, keep_through: int | None = None):
        """``keep_through``: keep the existing rows of epochs up to this one (a resumed run's past); later rows
        belong to a future this run no longer has (a resume from an older checkpoint) and are dropped."""
        self.path, self.rows = path, []
        if path.is_file():
            with open(path) as f:
                self.rows = list(csv.DictReader(f))
            if keep_through is not None:
                self.rows = [r for r in self.rows if int(r["epoch"]) <= keep_through]
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception as e:  # optional extra
                log.warning("TensorBoard unavailable (%s); pip install 'widedeep[tensorboard]'", e)

    def add(self, row: dict) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) != int(row["epoch"])] + [row]
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.path, text.getvalue().encode())
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(row["epoch"]))

    def plot(self, path: Path) -> None:
        """Loss and eval metric per epoch as a PNG (matplotlib when installed, else a plain Pillow drawing)."""
        keys = dict.fromkeys(k for r in self.rows for k in r if k not in ("epoch", "lr", "epoch_s"))
        series = {k: [float(r[k]) if r.get(k) not in (None, "") else math.nan for r in self.rows] for k in keys}
        epochs = [int(r["epoch"]) for r in self.rows]
        if not epochs:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
            for ax, (k, v) in zip(axes[0], series.items()):
                ax.plot(
                    [e for e, x in zip(epochs, v) if not math.isnan(x)], [x for x in v if not math.isnan(x)], marker="o"
                )
                ax.set_title(k)
                ax.set_xlabel("epoch")
            fig.tight_layout()
            fig.savefig(path, dpi=80)
            plt.close(fig)
        except ImportError:
            _pil_plot(path, epochs, series)


def _pil_plot(path: Path, epochs: list[int], series: dict[str, list[float]]) -> None:
    from PIL import Image, ImageDraw

    w, h = 320, 200
    img = Image.new("RGB", (w * max(1, len(series)), h), "white")
    d = ImageDraw.Draw(img)
    for i, (name, vals) in enumerate(series.items()):
        pts = [(e, v) for e, v in zip(epochs, vals) if not math.isnan(v)]
        d.text((i * w + 10, 5), name, fill="black")
        if len(pts) < 2:
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        e0, e1 = min(epochs), max(epochs)
        xy = [
            (i * w + 20 + (e - e0) / max(1, e1 - e0) * (w - 40), h - 20 - (v - lo) / max(1e-12, hi - lo) * (h - 50))
            for e, v in pts
        ]
        d.line(xy, fill="blue", width=2)
    img.save(path)
