#!/usr/bin/env bash
# Move the pins forward: resolve the newest releases in a fresh virtual environment (torch and Triton stay as
# constraints/cpu.txt pins them; edit those two lines first to move them), run the test suite there, and only if it
# passes rewrite constraints/common.txt with what was installed. Review the diff, then commit it.
#   bash constraints/update.sh            (from anywhere; about 10-15 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/zo2-pins.XXXXXX")
trap 'rm -rf "$venv"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
grep -E '^(torch|triton)==' constraints/cpu.txt > "$venv/torch.txt"
pip install -q -c "$venv/torch.txt" -e ".[test,peft]"
python -m pytest -q -x
{
  sed -n '/^# Every package/,/^# writes this file/p' constraints/common.txt \
    | sed "s/on CPython [0-9.]*, [0-9-]*/on CPython $(python -c 'import platform; print(platform.python_version())'), $(date +%F)/"
  pip freeze --all --exclude-editable | grep -v -iE '^(torch|triton|pip)=='
  sed -n '/^# The \[deepspeed\] extra/,$p' constraints/common.txt
} > "$venv/common.txt"
mv "$venv/common.txt" constraints/common.txt
echo "constraints/common.txt rewritten from a passing environment:"
git --no-pager diff --stat constraints/common.txt || true
