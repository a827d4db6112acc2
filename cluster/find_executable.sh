# Sourced by the scripts in cluster/: find_executable NAME OVERRIDE prints the executable NAME of
# the environment hgdpo is installed in: $OVERRIDE if set, else NAME on PATH, else ./.venv/bin/NAME;
# it fails with a message naming OVERRIDE when there is none.
find_executable() {
  local name="$1" override="${!2:-}"
  if [[ -n "$override" ]]; then
    echo "$override"
  elif command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
  elif [[ -x ".venv/bin/$name" ]]; then
    echo "$(pwd)/.venv/bin/$name"
  else
    echo "error: no \`$name\` found: activate the environment hgdpo is installed in, or set $2" >&2
    return 1
  fi
}
