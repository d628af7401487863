#!/usr/bin/env python3
"""Users and permissions of the MLflow authentication app, idempotent (standard library only).

Run as the MLflow admin: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
(and MLFLOW_TRACKING_SERVER_CERT_PATH behind a proxy with a private CA). The compose stack runs
``ensure-user`` once at start for the workers' account; operators use ``grant`` by hand:

    python infra/mlflow_users.py ensure-user --user quantlens-worker --password-env MLFLOW_WORKER_PASSWORD
    python infra/mlflow_users.py grant --user quantlens-worker --experiment quantlens-paper1 [--permission EDIT]

``ensure-user`` creates the user, or resets its password to the given one when it exists (the
secret is the source of truth). ``grant`` gives a user a permission (READ, EDIT, MANAGE,
NO_PERMISSIONS) on an experiment by name. Exit 0 on success, 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


class Admin:
    def __init__(self) -> None:
        self.url = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
        cred = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
        self.headers = {"Authorization": "Basic " + base64.b64encode(cred.encode()).decode(), "Content-Type": "application/json"}
        ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        self.context = ssl.create_default_context(cafile=ca) if self.url.startswith("https://") else None

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> tuple[int, dict]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.context) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", "replace")
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, {"message": text.strip()}

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5, context=self.context):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def ensure_user(self, user: str, password: str) -> str:
        code, out = self.call("POST", "/api/2.0/mlflow/users/create", {"username": user, "password": password})
        if code == 200:
            return f"created MLflow user {user!r}"
        if out.get("error_code") == "RESOURCE_ALREADY_EXISTS":
            code, out = self.call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": user, "password": password})
            if code == 200:
                return f"MLflow user {user!r} exists; password set from the secret"
        raise SystemExit(f"mlflow_users: cannot create user {user!r}: HTTP {code} {out.get('message', out)}")

    def grant(self, user: str, experiment: str, permission: str) -> str:
        code, out = self.call("GET", "/api/2.0/mlflow/experiments/get-by-name", query={"experiment_name": experiment})
        if code != 200:
            raise SystemExit(f"mlflow_users: no experiment {experiment!r}: HTTP {code} {out.get('message', out)}")
        exp_id = out["experiment"]["experiment_id"]
        body = {"username": user, "resource_type": "experiment", "resource_id": exp_id, "permission": permission}
        code, out = self.call("POST", "/api/3.0/mlflow/users/permissions/grant", body)
        if code != 200:
            raise SystemExit(f"mlflow_users: cannot grant {permission} on {experiment!r} to {user!r}: HTTP {code} {out.get('message', out)}")
        return f"{user!r} has {permission} on experiment {experiment!r} ({exp_id})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wait", type=float, default=0, help="wait this many seconds for the server first")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("ensure-user", help="create a user, or set its password")
    e.add_argument("--user", required=True)
    e.add_argument("--password-env", required=True, help="environment variable holding the password")
    g = sub.add_parser("grant", help="give a user a permission on an experiment")
    g.add_argument("--user", required=True)
    g.add_argument("--experiment", required=True)
    g.add_argument("--permission", default="EDIT", choices=["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"])
    args = p.parse_args(argv)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if not os.environ.get(var):
            print(f"mlflow_users: set {var} (the admin's)", file=sys.stderr)
            return 1
    admin = Admin()
    try:
        if args.wait:
            admin.wait(args.wait)
        if args.cmd == "ensure-user":
            password = os.environ.get(args.password_env, "")
            if len(password) < 12:
                print(f"mlflow_users: {args.password_env} must hold a password of 12+ characters", file=sys.stderr)
                return 1
            print(admin.ensure_user(args.user, password))
        else:
            print(admin.grant(args.user, args.experiment, args.permission))
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        print(f"mlflow_users: {admin.url} is not reachable: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
