"""Shared ground: configuration, database, time, security, storage, errors."""
