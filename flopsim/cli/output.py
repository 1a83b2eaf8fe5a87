"""Printing results as a rich table (for people), JSON or CSV (for scripts).
Files are written atomically: to a temporary name, then renamed."""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from enum import Enum
from typing import Any, Iterable


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


from flopsim.units import SI, human, human_time  # noqa: F401  (re-exported for the commands)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(data), indent=2) + "\n")


def print_csv(rows: Iterable[dict]) -> None:
    import pandas as pd

    pd.DataFrame(list(rows)).to_csv(sys.stdout, index=False)


def rich_table(title: str | None, columns: list[str], rows: list[list[Any]], justify_first: str = "left"):
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify=justify_first if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    return table


def console(stderr: bool = False):
    from rich.console import Console

    return Console(soft_wrap=False, width=max(100, int(os.environ.get("COLUMNS", "120"))), stderr=stderr)


@contextmanager
def progress_bar(label: str):
    """A transient progress bar on stderr, shown on a terminal only; yields tick(done, total)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = console(stderr=True)
    with Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
