"""Scorers: each rates (prompt, image) pairs, higher = better; PickScore ranks the pool, any of them evaluates."""
