"""Reads finished sweeps from MLflow: the report, promotion to the registry, local metric modules."""
