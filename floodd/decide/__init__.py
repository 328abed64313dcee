"""Decide: which counts cross which rule, what may be banned, for how long."""
