#!/usr/bin/env bash
# The main job: a self-contained demo of the library (create, write, verify, info).
# Usage: ./run-demo.sh [DIR]   (DIR keeps the demo disk; default: a temporary folder)
set -euo pipefail
cd "$(dirname "$0")"
exec cargo run --quiet --release -p vdisk-examples --bin vdisk-demo -- "$@"
