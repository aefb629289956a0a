"""Thin typer commands, one per DVC stage. The maths lives in `anomaly_core`."""
