"""edgeroute.cli: the command line. Thin: each command calls the library; errors become one line on stderr.

Subcommands load lazily (``LazyGroup``), so ``edgeroute run --help`` never imports torch or the export stack.
User mistakes (a missing model folder, a bad flag value, a prompt that does not fit, CUDA asked for but absent)
print ``edgeroute: error: ...`` on one line and exit non-zero (2 for usage errors, 1 otherwise); ``--verbose``
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click
from edgeroute._version import __version__
from edgeroute.errors import one_line

COMMANDS = {
    "adapter": "edgeroute.cli.adapter_cmd:adapter",
    "bench": "edgeroute.cli.bench_cmd:bench",
    "chat": "edgeroute.cli.chat_cmd:chat",
    "eval": "edgeroute.cli.eval_cmd:eval_cmd",
    "export": "edgeroute.cli.export_cmd:export",
    "info": "edgeroute.cli.info_cmd:info",
    "run": "edgeroute.cli.run_cmd:run",
    "serve": "edgeroute.cli.serve_cmd:serve",
}


def _one_line(e: BaseException | str) -> str:
    text = " ".join(e.split()) if isinstance(e, str) else one_line(e)
    return text if len(text) <= 500 else text[:497] + "..."


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when used, and whose errors are one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from edgeroute.errors import EdgerouteError

        argv = list(sys.argv[1:] if args is None else args)
        verbose = "--verbose" in argv
        try:
            rv = super().main(
                args=argv, prog_name=prog_name or "edgeroute", complete_var=complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("edgeroute: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "edgeroute"
            click.echo(f"edgeroute: error: {_one_line(e.format_message())} (see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"edgeroute: error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (EdgerouteError, OSError) as e:
            if verbose:
                raise
            click.echo(f"edgeroute: error: {_one_line(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\nedgeroute: interrupted", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeroute")
@click.option("--verbose", is_flag=True, help="Show the full traceback when something fails.")
def cli(verbose: bool) -> None:
    """edgeroute: export fine-tuned language models to ONNX and run them with a NumPy token router."""


def main() -> None:
    """Console entry point."""
    cli.main()
