"""The LoRA adapters a model folder keeps beside its base graph (``edgeroute adapter add/remove``, ``export
--lora``): each converted into ``MODEL/adapters/NAME.safetensors`` (``edgeroute.adapters.write_adapter``) and
listed in the manifest's ``adapters`` with its size and SHA-256, checked at load.

Nothing is half-written: the file is written under a temporary name and renamed to a name no listed file has, then
the manifest is rewritten the same way (``folder_io.update_json``: under a lock file, so two processes adding
adapters at once both land),
and only then is a replaced adapter's old file removed. A crash at any point leaves a folder that loads: the
manifest lists either the old file or the new one, each complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters import Adapter, LoraLayout, check_file_name, read_adapter, write_adapter
from .errors import AdapterError
from .folder_io import temporary, update_json
from .manifest import MANIFEST_NAME, Manifest, sha256_of


def add_to_folder(folder: str | Path, name: str, source: str | Path, force: bool = False, lock: bool = True) -> Adapter:
    """Convert the adapter at ``source`` (a PEFT folder or an adapter file) into ``folder/adapters/NAME.safetensors``
    and list it in the folder's manifest, without touching the base graph. Checked against the graph's layout first
    (:class:`AdapterError`); ``force`` replaces an adapter of the same name; ``lock=False`` for a folder no other
    process sees yet (an export's). The file is written under a temporary name and renamed, then the manifest
    rewritten the same way: nothing is half-written."""
    root = Path(folder).expanduser()
    check_file_name(name)
    manifest = Manifest.load(root)
    if manifest.lora is None:
        raise AdapterError(
            f"{root} was exported without adapter inputs: re-export the base with --lora-rank R (and --lora"
            " NAME=DIR), or merge the adapter (edgeroute export ADAPTER_DIR OUT)"
        )
    if name in manifest.adapters and not force:
        raise AdapterError(f"adapter {name!r} is already in {root} (pass --force to replace it)")
    adapter = read_adapter(source, name)
    LoraLayout(manifest.contract).check(adapter)
    adapter.info.setdefault("source", str(source))
    (root / "adapters").mkdir(exist_ok=True)
    tmp = temporary(root / "adapters" / f"{name}.safetensors")
    try:
        write_adapter(adapter, tmp)
        digest = sha256_of(tmp)
        rel = f"adapters/{name}.safetensors"
        if (root / rel).exists():  # replacing: a new name, so that the listed file stays whole until unlisted
            rel = f"adapters/{name}-{digest[:12]}.safetensors"
        entry: dict[str, Any] = {"file": rel, "bytes": tmp.stat().st_size, "sha256": digest}
        entry |= {k: adapter.info[k] for k in ("rank", "alpha", "source") if k in adapter.info}
        entry["modules"] = adapter.modules
        tmp.replace(root / rel)
    finally:
        tmp.unlink(missing_ok=True)
    old: list[str] = []

    def add(data: dict[str, Any]) -> None:
        listed = data.setdefault("adapters", {})
        if name in listed and listed[name]["file"] != rel:
            old.append(str(listed[name]["file"]))
        listed[name] = entry

    update_json(root / MANIFEST_NAME, add, lock)
    for gone in old:  # the replaced file, unlisted now
        (root / gone).unlink(missing_ok=True)
    return adapter


def remove_from_folder(folder: str | Path, name: str) -> None:
    """Unlist ``name`` from the folder's manifest, then delete its file."""
    root = Path(folder).expanduser()
    manifest = Manifest.load(root)
    if name not in manifest.adapters:
        listed = ", ".join(sorted(manifest.adapters)) or "none"
        raise AdapterError(f"adapter {name!r} is not in {root} (it lists: {listed})")
    rel = str(manifest.adapters[name]["file"])

    def drop(data: dict[str, Any]) -> None:
        data.get("adapters", {}).pop(name, None)  # gone already: another process removed it meanwhile
        if not data.get("adapters", True):
            del data["adapters"]

    update_json(root / MANIFEST_NAME, drop)
    (root / rel).unlink(missing_ok=True)
