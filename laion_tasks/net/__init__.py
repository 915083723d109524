"""Network helpers for stages that fetch from the open web (SSRF guard)."""
