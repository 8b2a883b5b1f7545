"""Manifests: the schema and validator, dataset builders, and face alignment."""
