"""Triggering web services (``/trigger``): interrupt the schedule with new observations."""
