-- The MLflow database is created by POSTGRES_DB; Prefect gets its own database on the same server.
CREATE DATABASE prefect OWNER quantlens;
