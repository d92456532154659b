"""Who is calling: service keys, end users' tokens, per-caller rate limits."""
