# MLflow tracking server with its authentication app, PostgreSQL and S3 drivers baked in: the
# compose stack's internal network has no route out, so nothing is installed at start. Same MLflow
# version as the tests ran against (tests/test_control_plane.py).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]>=3.1" boto3
COPY infra/mlflow_users.py /opt/quantlens/mlflow_users.py
COPY infra/mlflow-server.sh /opt/quantlens/mlflow-server.sh
ENTRYPOINT ["/opt/quantlens/mlflow-server.sh"]
