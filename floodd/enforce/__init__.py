"""Enforce: the bans in the kernel firewall, the state kept across restarts."""
