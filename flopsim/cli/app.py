"""The Typer application and the error convention every command shares.

Bad input (a FlopsimError, a click usage error) prints one line on stderr,
`flopsim: error: ...`, and exits 2, with no traceback. Command modules
register on `app` and import heavy modules inside their functions so that
`flopsim --help` stays fast.
"""

from __future__ import annotations

import copy
import sys

import typer
import typer.main
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
    from typer._click import echo
except ImportError:  # pragma: no cover - older typer on real click
    from click import echo
    from click import exceptions as click_exceptions

from flopsim.errors import FlopsimError


MAX_MESSAGE = 400  # characters of an error line (a value quoted in it is cut, never the line broken)


def fail(message: str, code: int = 2):
    """The one error line: whitespace (newlines in a quoted name, say) folded, long values cut."""
    line = " ".join(str(message).split())
    if len(line) > MAX_MESSAGE:
        line = line[:MAX_MESSAGE - 3] + "..."
    echo(f"flopsim: error: {line}", err=True)
    sys.exit(code)


class OneLineErrors(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name or "flopsim", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as err:  # `flopsim` alone: the help, exit 0
            echo(err.format_message() if hasattr(err, "format_message") else str(err))
            return 0
        except click_exceptions.UsageError as err:
            fail(" ".join(err.format_message().split()), 2)
        except click_exceptions.ClickException as err:
            fail(" ".join(err.format_message().split()), err.exit_code)
        except typer.Abort:
            fail("aborted", 1)
        except FlopsimError as err:
            fail(str(err), err.exit_code)
        except BrokenPipeError:
            sys.exit(1)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def narrowed(full: typer.Typer, argv: list) -> typer.Typer:
    """`full` with only the command that `argv` names (its first word), so that a run
    builds one command's parameters rather than every command's; `full` itself where
    argv names none of them (no command, an option first, a typo: the help and click's
    "No such command" need them all)."""
    if not argv or argv[0].startswith("-"):
        return full
    commands = [c for c in full.registered_commands
                if (c.name or typer.main.get_command_name(c.callback.__name__)) == argv[0]]
    groups = [g for g in full.registered_groups if g.name == argv[0]]
    if not commands and not groups:
        return full
    one = copy.copy(full)
    one.registered_commands, one.registered_groups = commands, groups
    return one


app = typer.Typer(
    cls=OneLineErrors,
    name="flopsim",
    help="FLOPs, bytes, memory and wall-clock of dense and conditional-computation transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from flopsim import __version__

        echo(f"flopsim {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print flopsim's version and exit.")) -> None:
    """The options before any command (--version); the help text is the app's."""
