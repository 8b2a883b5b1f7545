"""Manifest schema, dataset builders and face alignment (built by the manifest issues)."""
