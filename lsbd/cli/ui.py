"""Output helpers for the commands: the only place rich is used.

stdout carries what a command is asked for (tables, listings, plans, and
with --json one JSON document); stderr carries progress, notes on what was
done, and errors.  Progress bars are drawn only on a terminal."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Iterator

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

_json = False
_consoles: dict[str, "Console"] = {}


def prepare() -> None:
    """Load rich and set up the consoles now: a command can do it while it
    waits (`lsbd mount` while its serving process opens the volume) instead
    of before its first line of output.  Commands that print nothing never
    load it."""
    _console("out")


def _console(name: str) -> "Console":
    if not _consoles:
        from rich.console import Console

        _consoles["out"] = Console()
        _consoles["err"] = Console(stderr=True)
    return _consoles[name]


def __getattr__(name: str):
    # ui.out and ui.err, made on first use
    if name in ("out", "err"):
        return _console(name)
    raise AttributeError(name)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def configure(*, json: bool) -> None:
    """With --json, stdout holds one JSON document and stderr no notes."""
    global _json
    _json = json


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


class JsonArrayWriter:
    """One JSON object on stdout whose list member `key` is written item by
    item (a listing that is never held whole in memory)."""

    def __init__(self, head: dict, key: str):
        self._head = head
        self._key = key
        self._first = True
        sys.stdout.write("{" + "".join(f"{json.dumps(k)}: {json.dumps(v, default=str)}, "
                                       for k, v in head.items()) + f"{json.dumps(key)}: [")

    def item(self, value) -> None:
        sys.stdout.write(("\n  " if self._first else ",\n  ") + json.dumps(value, default=str))
        self._first = False

    def close(self, tail: dict) -> None:
        sys.stdout.write("]" + "".join(f", {json.dumps(k)}: {json.dumps(v, default=str)}"
                                       for k, v in tail.items()) + "}\n")
        sys.stdout.flush()


def done(data: dict, message: str) -> None:
    """The result of a command that changes something: `data` as JSON on
    stdout with --json, else `message` (rich markup) on stderr."""
    if _json:
        print_json(data)
    else:
        _console("err").print(message, soft_wrap=True)


def note(message: str) -> None:
    """A note for people on stderr (not with --json)."""
    if not _json:
        _console("err").print(message, soft_wrap=True)   # one line each, whatever the width


def bold(text: str) -> str:
    return f"[bold]{escape(text)}[/]"


def line(text: str) -> None:
    """One line of plain text on stdout (no markup)."""
    _console("out").print(text, markup=False, highlight=False, soft_wrap=True)


def problem(text: str) -> None:
    _console("err").print(f"[red]bad[/]: {escape(text)}", soft_wrap=True)


def table(title: str | None, columns: list[str], rows: list[list]) -> None:
    # A key/value table (no column names) has no empty header row.
    from rich.table import Table

    t = Table(title=title, show_header=any(columns))
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])
    _console("out").print(t)


def _progress(*columns: str) -> "Progress":
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Bytes(ProgressColumn):
        """done / total in binary units."""

        def render(self, task) -> Text:
            total = "?" if task.total is None else human_size(task.total)
            return Text(f"{human_size(task.completed)} / {total}")

    class _Speed(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{human_size(speed)}/s")

    class _Count(ProgressColumn):
        """done / total, or nothing while the total is unknown."""

        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            return Text(f"{int(task.completed)}/{int(task.total)}")

    made = {"bytes": _Bytes, "speed": _Speed, "count": _Count,
            "remaining": TimeRemainingColumn}
    err = _console("err")
    return Progress(TextColumn("{task.description}"), BarColumn(),
                    *(made[c]() for c in columns), console=err,
                    transient=True, disable=_json or not err.is_terminal)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator:
    """A progress bar on stderr counting bytes; yields advance(nbytes)."""
    with _progress("bytes", "speed", "remaining") as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextlib.contextmanager
def count_progress(description: str) -> Iterator:
    """A progress bar whose total is learnt on the way; yields update(done, total)."""
    with _progress("count") as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@contextlib.contextmanager
def byte_steps(description: str) -> Iterator:
    """A progress bar counting bytes whose total is learnt on the way;
    yields update(done, total)."""
    with _progress("bytes", "speed", "remaining") as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)
