"""Prefect flows: sweep → one model subflow per model → aggregate."""
