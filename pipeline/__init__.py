"""The editing engine and the Ray stage (built by the engine and main-job issues)."""
