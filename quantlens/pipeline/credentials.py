"""Credentials preflight for the control plane: an MLflow server and a Prefect API that ask for them.

Both are checked with one cheap request each, before any model loads or Prefect starts, so a sweep
with missing or wrong credentials ends in seconds with one line that names the server and the
variables to set — not after MLflow's or Prefect's minutes of retries, and never mid-sweep.

The variables are the ones the MLflow and Prefect clients themselves read (nothing of ours):

- MLflow: ``MLFLOW_TRACKING_USERNAME`` + ``MLFLOW_TRACKING_PASSWORD`` (basic auth, MLflow's
  authentication app) or ``MLFLOW_TRACKING_TOKEN`` (a bearer token, e.g. a gateway's);
  TLS: ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (a CA bundle) or ``MLFLOW_TRACKING_INSECURE_TLS=true``.
- Prefect: ``PREFECT_API_AUTH_STRING`` (``user:password``, the server's
  ``PREFECT_SERVER_API_AUTH_STRING``) or ``PREFECT_API_KEY`` (Prefect Cloud);
  TLS: ``PREFECT_API_SSL_CERT_FILE`` or ``PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true``.

Standard library only (no MLflow, no Prefect): the CLI calls this before importing either.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from quantlens.pipeline.errors import CredentialsRefused, TrackingUnavailable

MLFLOW_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
PREFECT_VARS = "PREFECT_API_AUTH_STRING (user:password of the server's PREFECT_SERVER_API_AUTH_STRING; PREFECT_API_KEY on Prefect Cloud)"
WRITABLE = {"EDIT", "MANAGE"}  # MLflow permissions that may create and update runs


def _true(name: str, env: dict[str, str]) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Endpoint:
    """One server as its client would call it: headers, TLS context, and who we claim to be."""

    url: str
    headers: dict[str, str]
    who: str  # "no credentials" / "user 'x'" / "a token": for the error line
    context: ssl.SSLContext | None

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        """(HTTP status, body) of a GET; a refused connection or TLS failure raises ``OSError``."""
        req = urllib.request.Request(self.url.rstrip("/") + path, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8", "replace")


def _context(url: str, ca_var: str, insecure_var: str, env: dict[str, str]) -> ssl.SSLContext | None:
    if not url.startswith("https://"):
        return None
    if _true(insecure_var, env):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=env.get(ca_var) or env.get("REQUESTS_CA_BUNDLE") or None)


def mlflow_endpoint(uri: str, env: dict[str, str] | None = None) -> Endpoint:
    env = dict(os.environ if env is None else env)
    headers, who = {}, "no credentials"
    if env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"], who = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}", "a token (MLFLOW_TRACKING_TOKEN)"
    elif env.get("MLFLOW_TRACKING_USERNAME") or env.get("MLFLOW_TRACKING_PASSWORD"):
        user, pw = env.get("MLFLOW_TRACKING_USERNAME", ""), env.get("MLFLOW_TRACKING_PASSWORD", "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        who = f"user {user!r}" if pw else f"user {user!r} without MLFLOW_TRACKING_PASSWORD"
    return Endpoint(uri, headers, who, _context(uri, "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", env))


def prefect_endpoint(api_url: str, env: dict[str, str] | None = None) -> Endpoint:
    env = dict(os.environ if env is None else env)
    headers, who = {}, "no credentials"
    if env.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        who = f"user {env['PREFECT_API_AUTH_STRING'].split(':', 1)[0]!r} (PREFECT_API_AUTH_STRING)"
    elif env.get("PREFECT_API_KEY"):
        headers["Authorization"], who = f"Bearer {env['PREFECT_API_KEY']}", "an API key (PREFECT_API_KEY)"
    return Endpoint(api_url, headers, who, _context(api_url, "PREFECT_API_SSL_CERT_FILE", "PREFECT_API_TLS_INSECURE_SKIP_VERIFY", env))


def _unreachable(server: str, url: str, err: OSError, ca_var: str) -> TrackingUnavailable:
    reason = getattr(err, "reason", err)
    if isinstance(reason, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(err):
        return TrackingUnavailable(
            f"{server} {url!r}: its TLS certificate is not trusted ({getattr(reason, 'verify_message', reason)}): "
            f"set {ca_var} to the CA certificate of its proxy (infra/README.md); nothing was evaluated"
        )
    return TrackingUnavailable(f"{server} {url!r} is not reachable ({reason}); nothing was evaluated")


def check_mlflow(uri: str, experiment: str, env: dict[str, str] | None = None, timeout: float = 10.0) -> None:
    """Raise :class:`CredentialsRefused` when the MLflow server at ``uri`` refuses who we are, or
    when an existing ``experiment`` is one we may read but not write; :class:`TrackingUnavailable`
    when it cannot be reached or answers with a server error. A server without authentication passes (nothing is asked)."""
    ep = mlflow_endpoint(uri, env)
    q = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        code, body = ep.get(f"/api/2.0/mlflow/experiments/get-by-name?{q}", timeout)
    except OSError as err:
        raise _unreachable("MLflow server", uri, err, "MLFLOW_TRACKING_SERVER_CERT_PATH") from None
    if code >= 500:
        raise TrackingUnavailable(f"MLflow server {uri!r} is unhealthy (HTTP {code})")
    if code == 401:
        raise CredentialsRefused(f"MLflow server {uri} refused the credentials ({ep.who}): set {MLFLOW_VARS}; nothing was evaluated")
    if code == 403:
        raise CredentialsRefused(
            f"MLflow server {uri}: {ep.who} may not read experiment {experiment!r}: ask an MLflow admin for EDIT on it "
            f"(infra/mlflow_users.py grant) or set {MLFLOW_VARS} of a user who has it; nothing was evaluated"
        )
    if code != 200 or "Authorization" not in ep.headers or ep.who.startswith("a token"):
        return  # absent experiment (we create it and own it), or nothing more to ask a token gateway
    exp_id = json.loads(body)["experiment"]["experiment_id"]
    user = (env if env is not None else os.environ).get("MLFLOW_TRACKING_USERNAME", "")
    q = urllib.parse.urlencode({"username": user, "resource_type": "experiment", "resource_id": exp_id})
    try:
        code, body = ep.get(f"/api/3.0/mlflow/users/permissions/get?{q}", timeout)
    except OSError:
        return
    if code == 200:  # servers before MLflow 3.17 have no such endpoint: a write fails later, once
        permission = json.loads(body).get("permission", "")
        if permission not in WRITABLE:
            raise CredentialsRefused(
                f"MLflow server {uri}: {ep.who} has {permission or 'no'} permission on experiment {experiment!r} and "
                f"cannot log runs: ask an MLflow admin for EDIT on it (infra/mlflow_users.py grant) or set {MLFLOW_VARS} "
                "of a user who has it; nothing was evaluated"
            )


def check_prefect(api_url: str, env: dict[str, str] | None = None, timeout: float = 10.0) -> None:
    """Raise :class:`CredentialsRefused` when the Prefect API refuses who we are,
    :class:`TrackingUnavailable` when it cannot be reached."""
    ep = prefect_endpoint(api_url, env)
    try:
        code, _ = ep.get("/admin/version", timeout)  # /health answers without credentials: ask something that needs them
    except OSError as err:
        raise _unreachable("Prefect API", api_url, err, "PREFECT_API_SSL_CERT_FILE") from None
    if code in (401, 403):
        raise CredentialsRefused(f"Prefect API {api_url} refused the credentials ({ep.who}): set {PREFECT_VARS}; nothing was evaluated")
    if code >= 500 or code == 404:
        raise TrackingUnavailable(f"Prefect API {api_url} answered HTTP {code}: is PREFECT_API_URL the server's /api URL? nothing was evaluated")

