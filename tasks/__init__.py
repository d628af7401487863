"""Prefect tasks wrapping the framework-free core, and the MLflow tracking layer."""
