"""Real Label Studio server fixtures (session-scoped)."""
