"""Scorers: each rates (prompt, image) pairs, higher = better; any of them ranks a pool (PickScore by default) or
evaluates (``hgdpo.scorers.registry``)."""
