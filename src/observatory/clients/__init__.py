"""Clients of the ASVO service: ``mwa_client`` and its Python API."""
