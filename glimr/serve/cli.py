"""`glimr serve INDEX_DIR`: the search service and its web page (glimr/serve/api.py) under uvicorn.

`register(subparsers)` adds the subcommand to glimr's CLI; `python -m glimr.serve.cli serve ...` also works.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import stat
import sys
from pathlib import Path

from glimr.config import int_in

EXAMPLE = """example:
  glimr serve my-index                                  # http://127.0.0.1:8000/ (read-only)
  glimr serve my-index --port 8080 --token-file token   # POST/DELETE /api/images need 'Bearer <token>'

Endpoints: POST /api/search, GET /api/images/{id}, GET /api/images/{id}/explain?query=ID, POST /api/images,
DELETE /api/images/{id}, GET /api/stats, /healthz, /metrics; the page at /, the API's docs at /docs and its
schema at /openapi.json. Images added through the API are stored in INDEX_DIR/uploads/."""


def register(subparsers) -> argparse.ArgumentParser:
    from glimr.serve.api import ServeSettings

    d = ServeSettings()
    p = subparsers.add_parser("serve", help="serve an index: search API + web page (FastAPI, uvicorn)",
                              description="Hold the index's model and the index in one process and answer "
                                          "searches over HTTP; the web page is at /.",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", metavar="INDEX_DIR", help="index folder made by `glimr index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="TCP port (default 8000)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token that allows POST/DELETE /api/images; without it the "
                        "service is read-only")
    p.add_argument("--max-upload-mb", type=int_in(1, 1024), default=d.max_upload_bytes >> 20,
                   help=f"largest request body in MiB, else 413 (default {d.max_upload_bytes >> 20})")
    p.add_argument("--max-pixels", type=int_in(1, 10**10), default=d.max_pixels,
                   help=f"largest uploaded image, width x height, else 413 (default {d.max_pixels:,})")
    p.add_argument("--max-top", type=int_in(1, 10_000), default=d.max_top,
                   help=f"largest `top` of a search (default {d.max_top})")
    p.add_argument("--concurrency", type=int_in(1, 64), default=d.concurrency,
                   help="model forward passes at a time (default 1: on a CPU one pass uses every core)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
    return p


def read_token(path: str) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValueError(f"--token-file '{p}' does not exist: write a secret into it (e.g. "
                         f"`python -c 'import secrets; print(secrets.token_urlsafe())' > {p}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--token-file '{p}' cannot be read ({e}); check the file") from None
    if len(text) < 8 or any(c.isspace() for c in text):
        raise ValueError(f"--token-file '{p}' must hold one token of at least 8 characters without spaces")
    if os.stat(p).st_mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"warning: '{p}' is readable by other users (chmod 600 it)", file=sys.stderr)
    return text


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from glimr.serve.api import ServeSettings, create_app

    token = read_token(args.token_file) if args.token_file else None
    settings = ServeSettings(max_upload_bytes=args.max_upload_mb << 20, max_pixels=args.max_pixels,
                             max_top=args.max_top, default_top=min(20, args.max_top),
                             concurrency=args.concurrency)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: listening on {args.host}: other machines can reach this service", file=sys.stderr)
    app = create_app(args.index, token, settings=settings)
    svc = app.state.service
    print(f"glimr serve: index '{args.index}' ({svc.snapshot.stats['images']} images, model "
          f"{svc.snapshot.store.config.model}), {'read-only' if token is None else 'adds/deletes with the token'}"
          f"; http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    timeout_graceful_shutdown=5)
    finally:
        svc.close()   # the kept queries' folder, also when the port could not be bound
    return 0


def main(argv: list[str] | None = None) -> int:
    from glimr.cli import run_subcommand

    return run_subcommand(register, argv, "glimr serve")


if __name__ == "__main__":
    sys.exit(main())
