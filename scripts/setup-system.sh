#!/usr/bin/env bash
# Installs the Debian packages the tests need, when they are missing (idempotent):
#   prometheus  promtool checks the /metrics output
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if ((${#need[@]})); then
  echo "setup-system: installing ${need[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
