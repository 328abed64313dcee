#!/bin/sh
# floodd's demo, as root on Debian: installs what it needs (scripts/setup.sh), then runs
# floodd against a live flood in a lab of network namespaces and removes the lab.
# Options go to the demo: --offline (analyze a generated capture, no namespaces),
# --duration SECONDS, --rate QPS (per flooder), --legit-rate QPS.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m lab.demo "$@"
