#!/bin/sh
# Installs what floodd, its tests and its lab need on Debian, and floodd itself
# (editable) into .venv. Safe to run again. Needs root.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (floodd drives the firewall and network namespaces)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc libc6-dev pkg-config libpcap-dev libsystemd-dev \
    iptables ipset nftables iproute2 tcpdump tcpreplay bind9 dnsutils dnsperf systemd \
    prometheus tmux >/dev/null
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
