"""Administration from the command line: `python -m service.manage add-key NAME`.

`dco-prover serve --add-key NAME` runs this module (in a subprocess, so `prover` does not
import `service`). The key file is the one the server with the same config would read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from service.app import CONFIG_ENV, OVERRIDES_ENV
from service.auth import SCOPES, add_key
from service.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.manage")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-key", help="create an API key and print it (shown once)")
    add.add_argument("name", help="key id: letters, digits, '-' and '_'")
    add.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated: prove,check")
    add.add_argument("--rate-per-s", type=float, default=None, help="requests per second (default: server's)")
    add.add_argument("--burst", type=int, default=None, help="bucket size in requests (default: server's)")
    add.add_argument("--max-concurrent-jobs", type=int, default=None, help="queued+running jobs (default: server's)")
    args = parser.parse_args(argv)

    config = load_config(os.environ.get(CONFIG_ENV) or None, **json.loads(os.environ.get(OVERRIDES_ENV, "{}") or "{}"))
    try:
        key = add_key(
            config.keys_path,
            args.name,
            scopes=tuple(s.strip() for s in args.scopes.split(",") if s.strip()),
            rate_per_s=args.rate_per_s,
            burst=args.burst,
            max_concurrent_jobs=args.max_concurrent_jobs,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"created API key {args.name!r} in {config.keys_path} (it is not stored; keep it now):", file=sys.stderr)
    print(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
