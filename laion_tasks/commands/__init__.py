"""CLI command modules; each defines ``register(app: typer.Typer)``. Keep heavy imports inside the commands."""
