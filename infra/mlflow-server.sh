#!/bin/sh
# Starts MLflow's tracking server with its authentication app (basic auth). The compose stack runs
# it in the image of infra/mlflow-server.Dockerfile; the tests run this same script on 127.0.0.1.
#   BACKEND_URI, AUTH_DB_URI      stores of runs and of users/permissions (PostgreSQL, or sqlite:///…)
#   ARTIFACTS_DESTINATION         where the server keeps artifacts (default s3://mlflow); clients
#                                 upload through the server (--serve-artifacts): no S3 keys on workers
#   MLFLOW_ADMIN_PASSWORD         the `admin` user's password, set when the user store is empty
#   MLFLOW_FLASK_SERVER_SECRET_KEY stable secret for the auth app's sessions and CSRF
#   MLFLOW_AUTH_CACHE_TTL_S       seconds a checked password stays valid in a server worker (default
#                                 60; 0 = hash every request: ~1 s of CPU each, a sweep logs hundreds)
#   MLFLOW_BIND (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_ALLOWED_HOSTS (Host headers to
#                                 accept; MLflow's default: localhost and private IPs)
# Extra arguments go to `mlflow server` as they are (e.g. --workers 1).
set -eu
: "${BACKEND_URI:?set BACKEND_URI}" "${AUTH_DB_URI:?set AUTH_DB_URI}"
: "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
# Default permission READ: any signed-in user may look at results; writing needs EDIT, which the
# creator of an experiment (the workers' account) gets as MANAGE. Anonymous requests get 401.
# The file is written at start (mode 600) so that no password sits in the image.
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/mlflow-basic-auth.$$.ini}"
umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = $AUTH_DB_URI
admin_username = admin
admin_password = $MLFLOW_ADMIN_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_S:-60}
INI
# MLflow's job runner (GenAI prompt optimisation, trace roll-ups: four huey worker processes) is
# unused by quantlens: off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then set -- --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" "$@"; fi
exec mlflow server --app-name basic-auth \
  --host "${MLFLOW_BIND:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "$BACKEND_URI" \
  --artifacts-destination "${ARTIFACTS_DESTINATION:-s3://mlflow}" --serve-artifacts "$@"
