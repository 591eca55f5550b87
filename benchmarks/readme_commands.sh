#!/usr/bin/env bash
# Time README's two commands as a newcomer runs them: a fresh venv per run, pip's cache as it is
# (warm after the first run), the package from a clean export of HEAD, no Hugging Face download.
#   bash benchmarks/readme_commands.sh [RUNS] [--suite]
# RUNS fresh venvs time command 1 step by step (torch wheel, package, demo); with --suite the
# last venv also times command 2 (dev extras, then the whole suite). The load average is printed
# with each run: numbers from a busy machine say so.
set -euo pipefail
runs="${1:-3}"
suite="${2:-}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git -C "$repo" archive HEAD | tar -x -C "$work" --one-top-level=src
export HF_HUB_OFFLINE=1 HF_HUB_CACHE="$work/empty-hub-cache"
unset PYTHONPATH

seconds() {  # run "$@" quietly, print its wall time in seconds
  local start end
  start=$(date +%s.%N)
  "$@" >"$work/last.log" 2>&1 || { cat "$work/last.log" >&2; exit 1; }
  end=$(date +%s.%N)
  printf '%.1f' "$(echo "$end - $start" | bc)"
}

for run in $(seq "$runs"); do
  rm -rf "$work/venv" && python3 -m venv "$work/venv"
  pip="$work/venv/bin/pip"
  cd "$work/src"
  t_torch=$(seconds "$pip" install torch==2.13.0)
  t_pkg=$(seconds "$pip" install .)
  t_demo=$(seconds "$work/venv/bin/torchlens-edu" demo)
  total=$(echo "$t_torch + $t_pkg + $t_demo" | bc)
  echo "command 1, run $run: ${total} s (torch wheel ${t_torch}, package ${t_pkg}," \
       "demo ${t_demo}); load $(cut -d' ' -f1-3 /proc/loadavg)"
done

if [ "$suite" = "--suite" ]; then
  t_dev=$(seconds "$pip" install -e ".[dev]")
  t_tests=$(seconds "$work/venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider)
  echo "command 2: dev extras ${t_dev} s, the whole suite ${t_tests} s;" \
       "load $(cut -d' ' -f1-3 /proc/loadavg)"
  tail -1 "$work/last.log"
fi
