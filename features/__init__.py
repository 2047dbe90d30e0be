"""Feature definitions and their two engines: online (Redis) and offline (pandas)."""
