"""`cliplab serve`: the search page and HTTP API of an index."""

from __future__ import annotations

import argparse
import os

from cliplab.cli.arguments import add_debug, add_device, naming_models
from cliplab.errors import ConfigError
from cliplab.extras import installed


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cliplab serve`, its arguments and its ``--help``, to ``sub``."""
    p = sub.add_parser("serve", help="serve an index: search page and HTTP API",
                       description="Serve an index built by `cliplab index`: a web page (search "
                       "by text or image, similar images, paging, zero-shot labels) and a JSON "
                       "API (schema at /openapi.json; the /docs page loads Swagger UI from a "
                       "CDN, so it is blank offline).")
    p.add_argument("index", metavar="INDEX", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this key on every API call (the X-API-Key "
                   "header, or ?api_key= in image URLs); default $CLIPLAB_API_KEY, which, "
                   "unlike a command's arguments, other users of the machine cannot read in `ps`")
    p.add_argument("--model", help="the index's model from another place (refused if its "
                   "weights differ)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="on a loopback --host, also answer requests addressed to NAME (e.g. the "
                   "name a reverse proxy forwards); repeatable. Otherwise only localhost, "
                   "127.0.0.1 and [::1] are answered: a web page cannot reach the server by a "
                   "name it controls (DNS rebinding)")
    p.add_argument("--max-upload-mb", metavar="MB", type=float, default=10,
                   help="request size limit in MB (default 10)")
    add_device(p, in_config=False)
    add_debug(p)


# the modules the serve extra brings that `cliplab serve` imports (faiss: its own message)
SERVE_MODULES = {("fastapi",): "fastapi", ("uvicorn",): "uvicorn",
                 ("python_multipart", "multipart"): "python-multipart"}  # new name, old name


def check_serve_extra() -> None:
    """A one-line error naming the extra when a package of it is missing (a traceback of
    ModuleNotFoundError otherwise, after a set-up that installs only the core)."""
    missing = [package for modules, package in SERVE_MODULES.items()
               if not any(installed(module) for module in modules)]
    if missing:
        raise ConfigError(f"cliplab serve needs {', '.join(missing)}: pip install "
                          "'cliplab[serve]'")


def run(args: argparse.Namespace) -> int:
    """`cliplab serve`; 0 when it succeeds (bad input raises `CliplabError`)."""
    check_serve_extra()
    from cliplab.serve.run import serve

    api_key = args.api_key
    if api_key is None and "CLIPLAB_API_KEY" in os.environ:
        api_key = os.environ["CLIPLAB_API_KEY"]
        if not api_key.strip():  # set, but to nothing: a key was meant
            raise ConfigError("CLIPLAB_API_KEY is set but empty: give it the key, or unset it "
                              "to serve without one")
    with naming_models({args.model: "--model"} if args.model else {}):
        serve(args.index, host=args.host, port=args.port, model=args.model, api_key=api_key,
              max_upload_mb=args.max_upload_mb, device=args.device, allow_hosts=args.allow_host)
    return 0
