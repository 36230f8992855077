"""edgeroute.cli: the command line. Thin: each command calls the library; errors become one line on stderr.

Subcommands load lazily (``LazyGroup``), so ``edgeroute run --help`` never imports torch or the export stack.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from edgeroute._version import __version__

COMMANDS = {
    "export": "edgeroute.cli.export_cmd:export",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeroute")
@click.option("--verbose", is_flag=True, help="Show the full traceback when something fails.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """edgeroute: export fine-tuned language models to ONNX and run them with a NumPy token router."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: library errors become ``edgeroute: error: ...`` and exit status 1."""
    from edgeroute.errors import EdgerouteError

    args = sys.argv[1:] if argv is None else argv
    verbose = "--verbose" in args
    try:
        return cli.main(args=args, prog_name="edgeroute", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgeroute: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (EdgerouteError, OSError) as e:
        if verbose:
            raise
        click.echo(f"edgeroute: error: {_one_line(e)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("edgeroute: interrupted", err=True)
        sys.exit(130)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."
