"""The ``serve`` command's options (argparse only) and :class:`ServeConfig`, their checked form.

Kept free of web-server imports so that ``python -m indexer --help`` and ``serve --help``
answer at once, and so that the same checked settings can travel to worker processes as
JSON (the key itself never travels: each worker reads the key file).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from indexer.cli import DEVICES, HelpFormatter, UsageError, positive_int

__all__ = ["DEFAULT_MAX_K", "DEFAULT_MAX_UPLOAD_MB", "LOOPBACK", "ServeConfig", "add_parser", "config_from_args"]

LOOPBACK = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BATCH = 256
"""Most queries in one batch request (``ids`` or ``vectors``): bounds one request's work."""

EXAMPLES = """examples:
  python -m indexer serve indexes/photos
  curl -F image=@query.jpg 'http://127.0.0.1:8000/collections/photos/search?k=10'
  curl -H 'Content-Type: application/json' -d '{"id": 17, "k": 5}' \\
       http://127.0.0.1:8000/collections/photos/search
  python -m indexer serve indexes/photos indexes/shop --host 0.0.0.0 --api-key-file key.txt --workers 2

The OpenAPI page with every endpoint is at http://127.0.0.1:8000/docs.
"""


@dataclass(frozen=True)
class ServeConfig:
    """What one ``serve`` run serves and how; JSON-able so worker processes get the same."""

    collections: dict[str, str]  # URL name -> collection directory
    host: str = LOOPBACK
    port: int = 8000
    api_key_file: str | None = None
    workers: int = 1
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_k: int = DEFAULT_MAX_K
    max_batch: int = DEFAULT_MAX_BATCH
    embed_batch: int = 32
    device: str = "auto"
    access_log: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))


def collection_names(directories: list[Path]) -> dict[str, str]:
    """URL name (the folder's name) -> directory; two folders of one name are a usage error."""
    names: dict[str, str] = {}
    for directory in directories:
        name = directory.expanduser().resolve().name
        if not directory.is_dir():
            raise UsageError(f"collection not found: {directory}")
        if name in names:
            raise UsageError(f"two collections would be served as {name!r} ({names[name]} and {directory}); "
                             "serve folders with different names")
        names[name] = str(directory.expanduser().resolve())
    return names


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes, got {text!r}") from None
    if not 0 < value <= 4096:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected megabytes in (0, 4096], got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535 (0: any free port), got {value}")
    return value


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to ``python -m indexer``'s sub-parsers."""
    p = sub.add_parser(
        "serve", help="an HTTP API over collections (search, embed, items, thumbnails)",
        description="Serve collections over HTTP with a JSON API: search by uploaded image, vector or item "
        "id, embed an image, read items and thumbnails. Each collection is served under its folder's name "
        "and follows new generations (update, build) without a restart. Listens on 127.0.0.1 unless --host "
        "says otherwise; with --api-key-file every endpoint but /health needs 'Authorization: Bearer KEY'.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("collections", type=Path, nargs="+", metavar="COLLECTION", help="collection folders")
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--api-key-file", type=Path, help="file holding the API key (one line); then every endpoint "
                   "except /health needs the header 'Authorization: Bearer KEY'")
    p.add_argument("--workers", type=positive_int, default=1, help="server processes (default 1; one per core "
                   "for throughput: a process's Python work runs on one core); they share the memory-mapped vectors")
    p.add_argument("--max-upload-mb", type=_megabytes, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest request body in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--max-k", type=positive_int, default=DEFAULT_MAX_K,
                   help=f"largest k a search may ask for (default {DEFAULT_MAX_K})")
    p.add_argument("--embed-batch", type=positive_int, default=32, help="most concurrent uploads run through "
                   "the model together (default 32; 1: one at a time)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where ONNX Runtime and FAISS run (default auto: GPU when usable)")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The checked settings of a ``serve`` command line (collections exist, names unique)."""
    key_file = None
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise UsageError(f"API key file not found: {args.api_key_file}")
        key_file = str(args.api_key_file.resolve())
    return ServeConfig(collections=collection_names(args.collections), host=args.host, port=args.port,
                       api_key_file=key_file, workers=args.workers, max_upload_mb=args.max_upload_mb,
                       max_k=args.max_k, embed_batch=args.embed_batch, device=args.device,
                       access_log=not args.no_access_log)
