"""``python -m simgen`` runs the CLI."""

from simgen.cli import app

app()
