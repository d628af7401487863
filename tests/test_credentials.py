"""What the credentials preflight sends, from the clients' own variables (the servers: test_control_plane)."""

import base64
import ssl

import pytest

from quantlens.pipeline.credentials import check_mlflow, check_prefect, mlflow_endpoint, prefect_endpoint
from quantlens.pipeline.errors import TrackingUnavailable


def basic(value: str) -> str:
    return "Basic " + base64.b64encode(value.encode()).decode()


def test_mlflow_credentials_from_mlflows_variables():
    ep = mlflow_endpoint("http://h:5000", {"MLFLOW_TRACKING_USERNAME": "w", "MLFLOW_TRACKING_PASSWORD": "p:x"})
    assert ep.headers == {"Authorization": basic("w:p:x")} and ep.who == "user 'w'" and ep.context is None
    ep = mlflow_endpoint("http://h:5000", {"MLFLOW_TRACKING_USERNAME": "w"})
    assert ep.who == "user 'w' without MLFLOW_TRACKING_PASSWORD"
    ep = mlflow_endpoint("http://h:5000", {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_TRACKING_USERNAME": "w"})
    assert ep.headers == {"Authorization": "Bearer t"}  # the token wins, as in MLflow's client
    assert mlflow_endpoint("http://h:5000", {}).headers == {}


def test_prefect_credentials_and_tls_from_prefects_variables():
    ep = prefect_endpoint("https://h/api", {"PREFECT_API_AUTH_STRING": "admin:pw", "PREFECT_API_KEY": "k"})
    assert ep.headers == {"Authorization": basic("admin:pw")} and "admin" in ep.who and "pw" not in ep.who
    assert prefect_endpoint("https://h/api", {"PREFECT_API_KEY": "k"}).headers == {"Authorization": "Bearer k"}
    insecure = prefect_endpoint("https://h/api", {"PREFECT_API_TLS_INSECURE_SKIP_VERIFY": "true"}).context
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    assert prefect_endpoint("https://h/api", {}).context.verify_mode == ssl.CERT_REQUIRED


def test_unreachable_servers_are_one_line_and_fast():
    with pytest.raises(TrackingUnavailable, match=r"MLflow server 'http://127.0.0.1:9' is not reachable"):
        check_mlflow("http://127.0.0.1:9", "e", {}, timeout=2)
    with pytest.raises(TrackingUnavailable, match=r"Prefect API 'http://127.0.0.1:9/api' is not reachable"):
        check_prefect("http://127.0.0.1:9/api", {}, timeout=2)
