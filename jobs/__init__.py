"""The `maskface` command line and job specs."""
