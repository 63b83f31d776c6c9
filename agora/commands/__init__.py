"""One module per command group of ``agora``; agora/cli.py assembles them.

Each module defines its commands (and, for a group, a ``group()`` that builds its typer
app); none imports torch, FastAPI or SQLAlchemy at module level.
"""
