"""The weights engine: torch checkpoints to Orbax, loading, validation."""
