"""The pipeline around the core: the sweep description and run identity, preflight, credentials,
the console, the errors the CLI answers in one line, and the CLI itself. Prefect and MLflow are
imported only by ``quantlens.flows`` / ``quantlens.tasks`` and inside CLI commands.
"""
