"""`cliplab serve INDEX`: open a complete index, load its model, run the app with uvicorn."""

from __future__ import annotations

import ipaddress

from cliplab.errors import ConfigError
from cliplab.serve.index import SearchIndex


def open_app(index_path: str, model: str | None = None, api_key: str | None = None,
             max_upload_mb: float = 10):
    """The app over ``index_path`` with its own model (or ``model``, refused if its weights
    differ from the index's)."""
    from cliplab.models.resolve import load_model
    from cliplab.serve.app import create_app

    index = SearchIndex(index_path)
    loaded = load_model(model or index.record["model"])
    return create_app(index, loaded, api_key=api_key, max_upload_bytes=int(max_upload_mb * (1 << 20)))


def serve(index_path: str, host: str = "127.0.0.1", port: int = 8000, model: str | None = None,
          api_key: str | None = None, max_upload_mb: float = 10) -> None:
    """Serve until interrupted. Binding beyond loopback without an API key is allowed but warned."""
    import uvicorn

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: must be 1..65535")
    if max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: must be positive")
    app = open_app(index_path, model, api_key, max_upload_mb)
    if not _is_loopback(host) and api_key is None:
        print(f"cliplab serve: warning: listening on {host} without --api-key; anyone who can "
              "reach this address can search the collection")
    print(f"cliplab serve: http://{host}:{port}/  (API schema at /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
