-- The MLflow database is created by POSTGRES_DB; Prefect and the MLflow auth app get their own on the same server.
CREATE DATABASE prefect OWNER quantlens;
CREATE DATABASE mlflow_auth OWNER quantlens;
