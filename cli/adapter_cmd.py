"""``edgeroute adapter``: the LoRA adapters a model folder keeps beside its base graph (``add``, ``remove``,
``list``). The base is never re-exported: an adapter is converted (NumPy only, no PyTorch), checked against the
graph's adapter inputs and written into ``MODEL/adapters/``, then listed in the manifest."""

from __future__ import annotations

import click

from .options import verbose_option


@click.group()
def adapter() -> None:
    """The LoRA adapters of a model folder exported with --lora-rank (or --lora)."""


@adapter.command("add")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.argument("source", type=click.Path(exists=True))
@click.option("--force", is_flag=True, help="Replace an adapter of the same name.")
@verbose_option
def add(model_dir: str, name: str, source: str, force: bool) -> None:
    """Add the PEFT LoRA adapter folder SOURCE to MODEL_DIR as NAME (no re-export of the base)."""
    from edgeroute.adapter_folder import add_to_folder

    got = add_to_folder(model_dir, name, source, force=force)
    mb = got.nbytes / 2**20
    click.echo(f"added adapter {name} to {model_dir}: rank {got.rank}, {', '.join(got.modules)}, {mb:.1f} MiB")


@adapter.command("remove")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@verbose_option
def remove(model_dir: str, name: str) -> None:
    """Remove the adapter NAME from MODEL_DIR."""
    from edgeroute.adapter_folder import remove_from_folder

    remove_from_folder(model_dir, name)
    click.echo(f"removed adapter {name} from {model_dir}")


@adapter.command("list")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@verbose_option
def list_adapters(model_dir: str) -> None:
    """The adapters MODEL_DIR keeps, and what its graph takes."""
    from edgeroute.manifest import Manifest

    m = Manifest.load(model_dir)
    if m.lora is None:
        click.echo(f"{model_dir}: no adapter inputs (export the base with --lora-rank to take adapters)")
        return
    click.echo(f"{model_dir}: adapters of rank <= {m.lora['rank']} on {', '.join(m.lora['targets'])}")
    for name, entry in m.adapters.items():
        size = entry["bytes"] / 2**20
        modules = ", ".join(entry.get("modules", []))
        click.echo(f"  {name}: rank {entry.get('rank', '?')}, {modules}, {size:.1f} MiB ({entry.get('source', '')})")
    if not m.adapters:
        click.echo("  (none yet: edgeroute adapter add MODEL_DIR NAME PEFT_DIR)")
