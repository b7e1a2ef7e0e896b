#!/usr/bin/env bash
# One-shot GPU check (issue 18): run on a machine with a GPU, from the repository root.
# Bounded to 8 minutes in all; each section says SKIP or FAIL on its own (see bench/gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
timeout 470 python bench/gpu_check.py "$@"
