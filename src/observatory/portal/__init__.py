"""The web portal: sign-in, profile (API key), jobs, submission, observations."""
