"""Detect: packets from libpcap or a capture file, parsed and counted in sliding windows."""
