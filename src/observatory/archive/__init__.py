"""Observations (the schedule) and their files; ingest; the /metadata service."""
