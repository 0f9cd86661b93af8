"""ASVO data jobs: the ``/api`` that mwa_client and giant-squid speak, and the job pipeline."""
