#!/usr/bin/env bash
# README.md = docs/readme_head.md + the generated config reference + docs/sections/*.md
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat docs/readme_head.md
  .venv/bin/python scripts/config_reference.py
  for f in docs/sections/*.md; do echo; cat "$f"; done
} > README.md
