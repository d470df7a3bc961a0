#!/usr/bin/env bash
# Installs the system tools the test suite runs, where this user can: Debian's
# prometheus package (it brings promtool), as root or with passwordless sudo.
# Where it cannot, it writes why to the file named by $1, and the tests that
# need the tool skip with that reason (under CI=true a missing tool without a
# reason fails them instead).
set -u
reason_file=$1
rm -f "$reason_file"
command -v prometheus >/dev/null && command -v promtool >/dev/null && exit 0

missing() {
  echo "$1" > "$reason_file"
  echo "warning: prometheus is not installed: $1; the monitoring tests will skip" >&2
  exit 0
}
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  missing "installing it needs root or passwordless sudo (apt-get install prometheus)"
fi
command -v apt-get >/dev/null || missing "this machine has no apt-get; install Prometheus 2.x with promtool on PATH"
export DEBIAN_FRONTEND=noninteractive
echo "Installing Debian's prometheus for the monitoring tests"
$sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 ||
  { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } ||
  missing "apt-get install prometheus failed"
