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
    prometheus tmux exabgp bird2 >/dev/null
# crowdsec (the fleet tests' Local API): its post-install registers with CrowdSec's online
# API, which fails offline, unless online credentials exist; a comment line is enough (the
# tests run their own Local API with -no-capi).  Never overwrites real credentials.
if [ ! -e /etc/crowdsec/online_api_credentials.yaml ]; then
    mkdir -p /etc/crowdsec
    echo "# no online API: floodd's tests run an offline Local API" \
        > /etc/crowdsec/online_api_credentials.yaml
fi
apt-get install -y -qq --no-install-recommends crowdsec >/dev/null || dpkg --configure -a
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
