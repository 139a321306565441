"""Conformance with mergekit 0.1.5, run as a subprocess from its own venv."""
