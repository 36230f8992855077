"""LoRA adapters through the server, in vLLM's conventions (mixed into ``serve.app``'s routes): ``/v1/models``
lists each adapter loaded on the served model (``parent``: the served model, ``root``: where it was loaded from),
and ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` change them while requests run. Loading reads
files where the server runs, so both answer 403 unless the server has an API key or ``Settings.
allow_adapter_loading`` says otherwise. A request's ``model`` naming an adapter is ``serve.protocol.parse_model``'s.
"""

from __future__ import annotations

import logging
from typing import Any

import edgeroute as er
from edgeroute.adapters import AdapterSet
from edgeroute.errors import one_line
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .protocol import APIError, check_fields, check_type, invalid

log = logging.getLogger("edgeroute.serve")


class AdapterRoutes:
    """The adapter routes of ``serve.app._Api`` (which provides ``state``, ``settings``, ``transport``,
    ``_ready`` and ``_model_entry``)."""

    state: Any
    settings: Any
    transport: Any

    def _ready(self) -> tuple[er.Model, er.Engine]:
        raise NotImplementedError

    def _model_entry(self) -> dict[str, Any]:
        raise NotImplementedError

    def _adapter_entry(self, name: str) -> dict[str, Any]:
        """An adapter's entry, as vLLM lists one: ``parent`` the served model, ``root`` where it was loaded from."""
        s = self.state
        root, created = s.adapter_sources.get(name, (name, int(s.started)))
        entry = {**self._model_entry(), "id": name, "created": created, "root": root}
        entry["parent"] = self.settings.model_name
        return entry

    def _adapters(self) -> list[str]:
        model = self.state.model
        return [] if model is None else [n for n in model.adapters.names() if n != self.settings.model_name]

    # -- adapters at run time (vLLM's routes) -------------------------------------------------------------------
    def _may_change_adapters(self, path: str) -> None:
        """A 403 unless this server loads adapters at run time (``Settings.adapter_loading``)."""
        if self.settings.adapter_loading():
            return
        if self.settings.allow_adapter_loading is False:
            message = f"{path}: this server does not load or unload adapters at run time"
        else:
            message = (
                f"{path} is off on a server without an API key (a client could make it read any file it can): start"
                " it with --api-key, or with --allow-adapter-loading where every client is trusted"
            )
        raise APIError(403, message, None, "adapter_loading_disabled")

    async def _adapter_body(self, request: Request, fields: set[str]) -> tuple[er.Model, dict[str, Any], str]:
        """The checks every adapter route makes: allowed (403), the body (400), the model loaded (503), and the
        body's ``lora_name``."""
        self._may_change_adapters(request.url.path)
        body = check_fields(await self.transport.read_json(request), fields)
        model, _ = self._ready()
        name = check_type(body, "lora_name", str, "a string")
        if not name:
            raise invalid("lora_name", "lora_name is required: the adapter's name", "missing_required_parameter")
        if name == self.settings.model_name:
            raise invalid("lora_name", f"lora_name: '{name}' is the served model's name, not an adapter's")
        return model, body, name

    async def load_adapter(self, request: Request) -> Response:
        """``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: read and check the adapter (in a worker
        thread; requests run meanwhile), then serve it under its name. As vLLM: 200 with a line of text, a 400
        naming the parameter otherwise (a name already loaded included)."""
        model, body, name = await self._adapter_body(request, {"lora_name", "lora_path"})
        path = check_type(body, "lora_path", str, "a string")
        if not path:
            raise invalid(
                "lora_path",
                "lora_path is required: a PEFT adapter folder or an adapter file on the server",
                "missing_required_parameter",
            )
        adapters = model.adapters
        if name in adapters:
            raise invalid("lora_name", f"The lora adapter '{name}' has already been loaded", "adapter_already_loaded")
        if adapters.layout is None:
            raise invalid(
                None,
                "this model's graph takes no adapters: export the base with --lora-rank (or --lora) to serve them",
                "adapters_unsupported",
            )
        if len(adapters) >= adapters.max_adapters:
            raise _full(adapters)
        try:
            await run_in_threadpool(self.state.load_adapter, model, name, path)
        except er.ConfigError as e:  # the name: its letters or length
            raise invalid("lora_name", f"lora_name: {e.reason} (got {e.value!r})") from None
        except er.AdapterError as e:
            if name in adapters:  # another request loaded that name meanwhile
                raise invalid("lora_name", one_line(e), "adapter_already_loaded") from None
            if len(adapters) >= adapters.max_adapters:  # others were loaded meanwhile
                raise _full(adapters) from None
            raise invalid("lora_path", one_line(e), "invalid_adapter") from None
        log.info("loaded LoRA adapter %s from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> Response:
        """``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: new requests cannot name it (a 404); running ones
        finish on it. 404 for a name not loaded, as vLLM."""
        model, _, name = await self._adapter_body(request, {"lora_name"})
        try:
            model.unload_adapter(name)
        except er.AdapterError:
            loaded = ", ".join(model.adapters.names()) or "none"
            message = f"The lora adapter '{name}' cannot be found (loaded: {loaded})"
            raise APIError(404, message, "lora_name", "adapter_not_found") from None
        self.state.adapter_sources.pop(name, None)
        log.info("unloaded LoRA adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _full(adapters: AdapterSet) -> APIError:
    n = len(adapters)
    message = (
        f"{n} adapters are loaded, the most this server holds (--max-loras {adapters.max_adapters}): unload one"
        " first (POST /v1/unload_lora_adapter)"
    )
    return invalid(None, message, "too_many_adapters")
