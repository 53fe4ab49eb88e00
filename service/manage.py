"""Administration from the command line: `python -m service.manage keys list|add|revoke|rotate`.

`dco-prover keys ...` and `dco-prover serve --add-key NAME` run this module (in a
subprocess, so `prover` does not import `service`: the key file format has one owner,
`service.auth`). The key file is the one the server with the same config would read
(`$DCO_SERVICE_CONFIG`, `$DCO_SERVICE_OVERRIDES`). Every write is atomic and the file
stays 0600; a running server picks changes up within a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from service.app import CONFIG_ENV, OVERRIDES_ENV
from service.auth import LIMIT_FIELDS, SCOPES, add_key, list_keys, revoke_key, rotate_key
from service.config import load_config


def _add_limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated: prove,check")
    parser.add_argument("--rate-per-s", type=float, default=None, help="requests per second (default: server's)")
    parser.add_argument("--burst", type=int, default=None, help="bucket size in requests (default: server's)")
    parser.add_argument("--max-concurrent-jobs", type=int, default=None, help="queued+running jobs (default: server's)")
    parser.add_argument("--max-open-streams", type=int, default=None, help="open event streams (default: server's)")
    parser.add_argument("--max-concurrent-checks", type=int, default=None, help="/v1/check requests in flight (default: server's)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.manage")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-key", help="create an API key and print it (shown once); same as `keys add`")
    add.add_argument("name", help="key id: letters, digits, '-' and '_'")
    _add_limit_options(add)
    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    listing = ksub.add_parser("list", help="the keys, their scopes, limits and state (never secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    kadd = ksub.add_parser("add", help="create an API key and print it (shown once)")
    kadd.add_argument("name")
    _add_limit_options(kadd)
    revoke = ksub.add_parser("revoke", help="revoke a key for good (refused within a second)")
    revoke.add_argument("name")
    rotate = ksub.add_parser("rotate", help="give a key a new secret (printed once); the old one is revoked")
    rotate.add_argument("name")
    return parser


def _limits(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in LIMIT_FIELDS}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(os.environ.get(CONFIG_ENV) or None, **json.loads(os.environ.get(OVERRIDES_ENV, "{}") or "{}"))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = config.keys_path
    action = "add" if args.command == "add-key" else args.action
    try:
        if action == "add":
            scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())
            key = add_key(path, args.name, scopes=scopes, **_limits(args))
            print(f"created API key {args.name!r} in {path} (it is not stored; keep it now):", file=sys.stderr)
            print(key)
        elif action == "rotate":
            key = rotate_key(path, args.name)
            print(f"rotated API key {args.name!r} in {path}; the old secret is revoked. The new key (shown once):", file=sys.stderr)
            print(key)
        elif action == "revoke":
            revoke_key(path, args.name)
            print(f"revoked API key {args.name!r} in {path}", file=sys.stderr)
        else:
            entries = list_keys(path)
            if args.json:
                print(json.dumps(entries, indent=2))
            elif not entries:
                print(f"no API keys in {path}", file=sys.stderr)
            else:
                for entry in entries:
                    state = "revoked" if entry.get("revoked_at") else ("disabled" if entry.get("disabled") else "active")
                    limits = ", ".join(f"{k}={entry[k]:g}" for k in LIMIT_FIELDS if entry.get(k) is not None) or "server defaults"
                    created = time.strftime("%Y-%m-%d", time.gmtime(entry.get("created_at", 0)))
                    print(f"{entry['id']}\t{state}\tscopes={','.join(entry.get('scopes', SCOPES))}\tcreated={created}\tlimits: {limits}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
