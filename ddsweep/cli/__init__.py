"""The command line: parse options, build a config, call one library function.

One module per command group (train, probe, generate, study, report); this one holds the root
app, its error handling and the table of commands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from ddsweep import __version__
from ddsweep.cli import generate, probe, report, study, train
from ddsweep.errors import UserError

# MLflow's per-file download bars would drown our own progress output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Errors of the machine the user can fix (a full disk, a read-only or missing folder, a path
# through a file): one line naming the path, not a traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
    }
)


def environment_error(err: OSError) -> str:
    """One line for an OSError of the environment: what, which path, and the fix."""
    path = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or point DDSWEEP_HOME, DDSWEEP_CACHE or --out elsewhere) and re-run"
        return f"no space left writing {path}; {fix}: finished work is kept and resumes"
    return f"cannot write or read {path}: {err.strerror}; check the path and its permissions"


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a batch scheduler's preemption, `kill`) ends a command as Ctrl-C does: the
    running trial is recorded as interrupted and retried, runs are closed, exit status 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Group(TyperGroup):
    """Every mistake a user can make ends as one line on stderr and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone_mode = kwargs.pop("standalone_mode", True)
        try:
            with _sigterm_as_ctrl_c():
                rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[misc]
        except (typer.Abort, KeyboardInterrupt):
            typer.echo("ddsweep: interrupted; what was recorded is kept", err=True)
            sys.exit(130)
        except typer.TyperException as err:  # typer's own copy of click's usage errors
            message = err.format_message().strip()
            if message:  # empty: no_args_is_help has printed the help already
                ctx = getattr(err, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                typer.echo(f"ddsweep: error: {message}{hint}", err=True)
            sys.exit(2)
        except UserError as err:
            typer.echo(f"ddsweep: error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            if err.errno not in ENVIRONMENT_ERRNOS:
                raise  # anything else is a bug: its traceback is what a report needs
            typer.echo(f"ddsweep: error: {environment_error(err)}", err=True)
            sys.exit(2)
        code = rv if isinstance(rv, int) else 0
        if code == 130:  # typer turns Ctrl-C into 130 before we see it
            typer.echo("ddsweep: interrupted; what was recorded is kept", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_Group,
    help="Which block of a diffusion U-Net, at which epoch and noise step, classifies best?",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(given: bool) -> None:
    if given:
        typer.echo(f"ddsweep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
            show_default=False,
        ),
    ] = False,
) -> None:
    """Train DDPMs without labels, probe every U-Net block, sweep with Optuna, track in MLflow."""


app.command()(train.train)
app.command()(probe.probe)
app.command()(generate.sample)
app.command()(generate.fid)

study_app = typer.Typer(
    cls=_Group,
    help="Run a sweep file's grid as an Optuna study, every trial an MLflow child run.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")
study_app.command("probe-grid")(study.probe_grid)
study_app.command("fid-grid")(study.fid_grid)
study_app.command("train-grid")(study.train_grid)
study_app.command("status")(study.status)

app.command()(report.report)
app.command()(report.quickstart)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
