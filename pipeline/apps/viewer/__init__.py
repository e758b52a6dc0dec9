"""`distillery view`: a local, read-only trace viewer over the versioned store (docs/viewer.md)."""
