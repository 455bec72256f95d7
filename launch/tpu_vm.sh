#!/usr/bin/env bash
# Thin wrapper for people who prefer shell: the same subcommands and flags as
#   python -m launch.tpu_vm {create,setup,run,logs,stop,delete} --help
# e.g.  launch/tpu_vm.sh create --name=strata-v4 --zone=us-central2-b --accelerator_type=v4-8
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if [[ -x "${repo}/.venv/bin/python" ]]; then
  python="${repo}/.venv/bin/python"
fi
# Keep the caller's directory (relative paths such as --fetch_to stay as typed).
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${python}" -m launch.tpu_vm "$@"
