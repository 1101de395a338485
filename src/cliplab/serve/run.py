"""`cliplab serve INDEX`: open a complete index, load its model, run the app with uvicorn."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import math
import re
import socket
from pathlib import Path

from cliplab.errors import ConfigError, ModelError, warn
from cliplab.serve.image_files import release_large_images_at_once
from cliplab.serve.index import SearchIndex, embeds_otherwise
from cliplab.serve.index_generation import prepare_index
from cliplab.serve.middleware import LOOPBACK_NAMES

STOP_GRACE_S = 5.0  # how long a stopped server finishes requests in flight


def open_app(index_path: str, model: str | None = None, api_key: str | None = None,
             max_upload_mb: float = 10, device: str = "auto",
             allowed_hosts: list[str] | None = None):
    """The app over ``index_path`` with its own model (or ``model``, refused if its weights
    differ from the index's), on ``device``, answering the Host names ``allowed_hosts`` (None:
    any); set up for serving as a switched-to generation is (`prepare_index`)."""
    from cliplab.models.resolve import load_model
    from cliplab.serve.app import create_app

    index = SearchIndex(index_path)
    prepare_index(index, index_path)
    loaded = load_model(model, device) if model is not None else _recorded_model(index, device)
    return create_app(index, loaded, api_key=api_key,
                      max_upload_bytes=int(max_upload_mb * (1 << 20)), allowed_hosts=allowed_hosts)


def _recorded_model(index: SearchIndex, device: str):
    """The model the index records, checked against its fingerprint; a ``ModelError`` saying
    to pass ``--model`` if that folder is gone or now holds other weights."""
    from cliplab.models.resolve import load_model

    name = index.record["model"]["name"]
    if Path(name).is_absolute() and not Path(name).exists():
        raise ModelError(f"{index.path} was built with model {name}, which is gone; pass --model "
                         "with that model (a copy with the same weights)")
    loaded = load_model(index.record["model"], device)
    differs = embeds_otherwise(index.record, loaded)
    if differs:
        raise ModelError(f"{index.path} was built with model {name}, which now has {differs} "
                         "(a newer checkpoint? a changed folder?); pass --model with the model "
                         "it was built with, or rebuild the index")
    return loaded


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8000, model: str | None = None,
          api_key: str | None = None, max_upload_mb: float = 10, device: str = "auto",
          allow_hosts: list[str] | None = None) -> None:
    """Serve until interrupted. Binding beyond loopback without an API key is allowed but
    warned; on loopback only requests addressed to a loopback name (or ``allow_hosts``) are
    answered."""
    import uvicorn

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be 1..65535")
    if not math.isfinite(max_upload_mb) or max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: must be a positive number of MB")
    if api_key is not None and not api_key.strip():  # e.g. --api-key "$KEY" with KEY unset
        raise ConfigError("--api-key is empty: give the key (or leave the option out to serve "
                          "without one)")
    if api_key is not None and api_key != api_key.strip():  # HTTP strips a header's spaces
        raise ConfigError("--api-key starts or ends with spaces, which no client can send (HTTP "
                          "strips them from the X-API-Key header); give the key without them")
    if api_key is not None and not re.fullmatch(r"[\x20-\x7e]+", api_key):
        raise ConfigError("--api-key holds a character outside printable ASCII (such as € or "
                          "é), which clients send in other encodings than the server reads; "
                          "use letters, digits and punctuation only")
    hosts = None
    if _is_loopback(host):
        hosts = [*LOOPBACK_NAMES, host, *(allow_hosts or [])]
    elif allow_hosts:
        raise ConfigError(f"--allow-host applies to a loopback --host only; {host} answers any "
                          "name it is reached by (guard it with --api-key)")
    check_address(host, port)
    release_large_images_at_once()
    app = open_app(index_path, model, api_key, max_upload_mb, device, hosts)
    if not _is_loopback(host) and api_key is None:
        warn(f"serve: listening on {host} without --api-key; anyone who can reach this "
             "address can search the collection")
    print(f"cliplab serve: http://{host}:{port}/  (API schema at /openapi.json, docs at /docs; "
          "Ctrl-C stops)", flush=True)
    # a stop waits this long for requests in flight, then cuts them: an upload trickling in
    # would otherwise hold a stopped server (and its model) until its 120 s body deadline
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=STOP_GRACE_S)


def check_address(host: str, port: int) -> None:
    """Bind ``host:port`` the way uvicorn will, then let it go: a ``ConfigError`` saying what
    to change if the port is taken or the host is not an address of this machine."""
    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: cannot resolve it ({err.strerror}); give an address "
                          "of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is already in use (another server?); "
                              "pick another with --port") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host}: not an address of this machine; give one of its "
                              "addresses, e.g. 127.0.0.1 or 0.0.0.0") from None
        if err.errno == errno.EACCES:
            raise ConfigError(f"--port {port}: not allowed to listen on it (ports below 1024 "
                              "need privileges); pick another with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; check --host "
                          "and --port") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
