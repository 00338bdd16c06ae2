#!/usr/bin/env bash
# Each optimisation's effect, measured in one window: the same `mamlpp bench` command run with the
# source of each given commit (git worktrees in a temporary folder), one after another.
# Usage: MAMLPP_DATA=../shared/data bash benchmarks/ab.sh "COMMIT COMMIT ..." PRESET [bench arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
commits=$1; shift
trees=$(mktemp -d)
trap 'for c in $commits; do git worktree remove --force "$trees/$c" 2>/dev/null || true; done; rm -rf "$trees"' EXIT
for c in $commits; do
  git worktree add -q --detach "$trees/$c" "$c"
  echo "== $c $(git log -1 --format=%s "$c" | cut -c1-80)"
  PYTHONPATH="$trees/$c/src" .venv/bin/python -m mamlpp bench "$@"
done
