"""edgeroute.cli: the command line. Thin: every command calls the library and turns its errors into one line."""

from __future__ import annotations

import click

from edgeroute._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeroute")
def main() -> None:
    """edgeroute: export fine-tuned language models to ONNX and run them with a NumPy token router."""
