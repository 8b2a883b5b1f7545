"""Storage, at the very bottom: every module reads and writes URIs through this room.

    uris.py      names: redact a URI for logs, resolve one against another, a path kept
                 under its root, local or not; dotted keys of nested options
    storage.py   fsspec with the project's retry policy and timeouts; reads with a size
                 cap; whole-or-absent writes; storage failures as named errors
    documents.py bounded reading of the YAML documents the project reads (specs,
                 settings): capped in size, YAML anchors and aliases refused

May import: `pipeline.errors`, the standard library, fsspec, s3fs and PyYAML. Nothing of
maskface above it: `models/` and every room of `pipeline/` build on it. It is the only
room that imports fsspec or s3fs (`lint-imports`' "storage" contract and
tests/test_layout.py fail otherwise), so no URI is opened without the retry policy.
"""
