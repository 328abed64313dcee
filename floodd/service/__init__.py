"""Service: the daemon's main loop and what it speaks to (control socket, systemd, journald)."""
