"""What a benchmark suite returns, and how a run of suites is written out (JSON, rich tables)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchReport", "Figure", "Log", "SuiteResult", "log_info", "machine_meta", "plain", "quiet", "tables"]

Log = Callable[[str], None]
"""Where a suite writes its progress lines (the ``mmx.bench`` logger, ``print``, a rich console, nothing)."""

logger = logging.getLogger("mmx.bench")


def log_info(line: str) -> None:
    """The default :data:`Log`: the ``mmx.bench`` logger at INFO (the CLI and the scripts pass their own)."""
    logger.info(line)


def quiet(_: str) -> None:
    """A :data:`Log` that drops everything."""


def plain(data: Any) -> Any:
    """Tuples (architectures) as lists, for JSON."""
    if isinstance(data, dict):
        return {k: plain(v) for k, v in data.items()}
    return list(data) if isinstance(data, tuple) else data


@dataclass
class Figure:
    """One figure of mmx and the same figure of its alternative, measured in the same run.

    ``ratio = value / other``: below 1, mmx needs less (time, memory) than the alternative.
    """

    label: str
    value: float
    alternative: str
    other: float
    unit: str
    ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.value, self.other = float(self.value), float(self.other)
        self.ratio = self.value / self.other if self.other else math.nan


@dataclass
class SuiteResult:
    """A suite's figures (for the table), its raw measurements, notes, files written and run time."""

    name: str
    title: str
    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def machine_meta(device: torch.device, quick: bool, command: str | None = None) -> dict[str, Any]:
    """Date, device, versions and command line of a run."""
    import diffusers

    from mmx import __version__
    from mmx.bench.memory import memory_method
    from mmx.bench.timing import device_name

    return {
        "date": dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "mmx": __version__,
        "python": platform.python_version(),
        "quick": quick,
        "peak_memory_method": memory_method(device),
        "command": command if command is not None else " ".join(["mmx", *sys.argv[1:]]),
    }


@dataclass
class BenchReport:
    """The suites of one ``mmx bench`` run and the machine they ran on."""

    meta: dict[str, Any]
    suites: dict[str, SuiteResult] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``{"meta", "suites": {name: ...}, "errors": {name: message}}``."""
        return {"meta": self.meta, "suites": {k: v.to_dict() for k, v in self.suites.items()}, "errors": self.errors}

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` (folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        return path


def _num(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    digits = 3 if abs(value) < 1 else 2 if abs(value) < 100 else 1
    return f"{value:,.{digits}f}" + (f" {unit}" if unit else "")


def tables(report: BenchReport) -> list[Any]:
    """What ``mmx bench`` shows: rich tables of every suite's figures (ratios) and of the scaling points if
    measured, then each suite's notes and the files it wrote, as lines."""
    from rich.table import Table

    m = report.meta
    out: list[Any] = []
    table = Table(
        title=f"mmx bench: {m['device']}; torch {m['torch']}, diffusers {m['diffusers']}; {m['date']}"
        + (" (--quick)" if m.get("quick") else ""),
        caption="ratio = mmx / alternative, measured in the same run: below 1, mmx takes less",
    )
    for column, justify in (
        ("suite", "left"),
        ("figure", "left"),
        ("mmx", "right"),
        ("alternative", "left"),
        ("alternative's", "right"),
        ("ratio", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, suite in report.suites.items():
        for i, f in enumerate(suite.figures):
            table.add_row(
                name if i == 0 else "",
                f.label,
                _num(f.value, f.unit),
                f.alternative,
                _num(f.other, f.unit),
                _num(f.ratio),
            )
        table.add_section()
    for name, message in report.errors.items():
        table.add_row(name, f"[red]failed: {message}[/red]", "", "", "", "")
    out.append(table)
    scaling = report.suites.get("scaling")
    if scaling is not None:
        points = Table(
            title=f"scaling: one training step (forward, backward, AdamW); peak memory: "
            f"{scaling.details.get('peak_memory_method', m['peak_memory_method'])}"
        )
        for column in ("model", "resolution / horizon", "context tokens", "batch", "step ms", "peak MiB"):
            points.add_column(column, justify="left" if column == "model" else "right")
        for p in scaling.details.get("unet2d", {}).get("points", []):
            points.add_row(
                "UNet2D",
                f"{p['resolution']}x{p['resolution']}",
                str(p["context"]),
                str(p["batch"]),
                _num(p["step_ms"]),
                _num(p["peak_mib"]),
            )
        for p in scaling.details.get("unet1d", {}).get("points", []):
            points.add_row(
                f"UNet1D {p['variant']}",
                str(p["horizon"]),
                str(p["context"]),
                str(p["batch"]),
                _num(p["step_ms"]),
                _num(p["peak_mib"]),
            )
        out.append(points)
    for result in report.suites.values():
        out += [f"{result.name}: {note}" for note in result.notes] + [f"wrote {path}" for path in result.files]
    return out
