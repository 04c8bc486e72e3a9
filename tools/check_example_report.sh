#!/usr/bin/env bash
# Checks that the committed example report (reports/kjv-moe/) is what this aimc computes: reruns the whole
# `aimc report` on the CPU with the same settings and compares every number of report.json, summary.json and
# drift.json (wall-clock timings excepted). About a minute on two cores after the build.
#
# To regenerate the example instead:  cargo run --release -- report --backend cpu --out reports/kjv-moe
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test example_report -- --include-ignored
