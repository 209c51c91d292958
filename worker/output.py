"""Rendering for people and for pipes: rich tables on a terminal, plain lines otherwise."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.table import Table

from worker.models import ExecutionView, LogEntry, Status

T = TypeVar("T")
STATUS_STYLE = {
    Status.SUCCEEDED: "green", Status.FAILED: "red", Status.TIMED_OUT: "red", Status.CANCELLED: "yellow",
    Status.RUNNING: "cyan", Status.QUEUED: "blue", Status.SKIPPED: "dim",
}


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether output goes to a person (a TTY) rather than a pipe or file."""
    return (stream or sys.stdout).isatty()


def when(ts: float | None) -> str:
    """A timestamp as local ISO time to the second, or an empty string."""
    return dt.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else ""


def cell(value: Any) -> str:
    """One value as table text (JSON for containers, 'Null Value' for None, as the reference shows)."""
    if value is None:
        return "Null Value"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          numbered: bool = False, out: TextIO | None = None) -> None:
    """A table: aligned with rich on a terminal, tab-separated lines when piped."""
    out = out or sys.stdout
    heads = ["#", *columns] if numbered else list(columns)
    if is_terminal(out):
        grid = Table(title=title, title_justify="left", show_lines=False)
        for head in heads:
            grid.add_column(str(head), overflow="fold")
        for number, row in enumerate(rows, 1):
            grid.add_row(*([str(number)] if numbered else []), *(cell(v) for v in row))
        Console(file=out).print(grid)
        return
    if title:
        out.write(f"# {title}\n")
    out.write("\t".join(heads) + "\n")
    for number, row in enumerate(rows, 1):
        out.write("\t".join([*([str(number)] if numbered else []), *(cell(v) for v in row)]) + "\n")


def write_csv(columns: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """Rows as CSV with a header line."""
    writer = csv.writer(out or sys.stdout)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(v) if isinstance(v, dict | list) else v for v in row])


def waiting(wait: Callable[[], T], message: str) -> T:
    """Run ``wait`` behind a spinner on a terminal (stderr), silently otherwise."""
    if not is_terminal(sys.stderr):
        return wait()
    with Console(stderr=True).status(message):
        return wait()


def summary(outputs: Mapping[str, Any], width: int = 100) -> str:
    """Outputs in one short line: scalars as key=value, containers by size (``--json`` has them whole)."""
    parts = []
    for key, value in outputs.items():
        if isinstance(value, list):
            shown = cell(value) if len(cell(value)) <= 40 else f"[{len(value)} items]"
        elif isinstance(value, dict):
            shown = cell(value) if len(cell(value)) <= 40 else "{…}"
        else:
            shown = cell(value)
        parts.append(f"{key}={shown}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def status_text(status: Status) -> str:
    """A status, coloured on a terminal."""
    if is_terminal():
        return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"
    return str(status)


def execution_summary(view: ExecutionView) -> None:
    """The execution and a line per step."""
    rows = []
    for step in view.steps:
        took = f"{step.finished_at - step.started_at:.1f}s" if step.finished_at and step.started_at else ""
        detail = step.error["message"] if step.error else summary(step.outputs)
        rows.append([step.index, step.name, step.type, status_text(step.status), took, detail])
    title = f"{view.id}  project={view.project}  status={view.status}"
    if is_terminal():
        grid = Table(title=title, title_justify="left")
        for head in ("#", "name", "type", "status", "took", "outputs / error"):
            grid.add_column(head, overflow="fold")
        for row in rows:
            grid.add_row(*(str(v) for v in row))
        Console().print(grid)
    else:
        table(["#", "name", "type", "status", "took", "outputs/error"], rows, title=title)


def log_line(entry: LogEntry, out: TextIO | None = None) -> None:
    """One log entry; tables the steps wrote are drawn as tables."""
    out = out or sys.stdout
    stamp = dt.datetime.fromtimestamp(entry.ts).strftime("%H:%M:%S")
    step = "" if entry.step is None else f"[{entry.step}] "
    if entry.event == "table" and "columns" in entry.fields:
        out.write(f"{stamp} {step}{entry.fields.get('title', '')}\n")
        out.flush()
        table(entry.fields["columns"], entry.fields.get("rows", []), numbered=True, out=out)
        return
    fields = dict(entry.fields)
    text = str(fields.pop("message", entry.event))
    extras = " ".join(f"{k}={cell(v)}" for k, v in fields.items())
    level = "" if entry.level == "info" else f"{entry.level.upper()} "
    out.write(f"{stamp} {step}{level}{text} {extras}".rstrip() + "\n")
    out.flush()
