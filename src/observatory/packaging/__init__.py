"""Delivery packages: the QA2 packager."""
