#!/usr/bin/env bash
# Installs the system packages the test suite reads, where this user can (root or passwordless sudo):
# Debian's prometheus (it brings promtool) for the monitoring tests, wordnet-base with
# wordnet-sense-index (WordNet 3.0's database) to check the shipped knowledge graph against its source, and
# pocketsphinx-testdata (real recordings of read speech with their transcripts) for the speech tests.
# Where it cannot, it writes why to the file named by $1, and the tests that need them skip with that
# reason (under CI=true a missing package without a reason fails them instead).
set -u
reason_file=$1
rm -f "$reason_file"
packages="prometheus wordnet-base wordnet-sense-index pocketsphinx-testdata"
command -v prometheus >/dev/null && command -v promtool >/dev/null && [ -f /usr/share/wordnet/index.sense ] &&
  [ -f /usr/share/pocketsphinx/test/data/librivox/transcription ] && exit 0

missing() {
  echo "$1" > "$reason_file"
  echo "warning: $packages are not installed: $1; the tests that need them will skip" >&2
  exit 0
}
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  missing "installing them needs root or passwordless sudo (apt-get install $packages)"
fi
command -v apt-get >/dev/null || missing "this machine has no apt-get; install Prometheus 2.x with promtool on PATH, and WordNet 3.0 in /usr/share/wordnet"
export DEBIAN_FRONTEND=noninteractive
# Another install (unattended-upgrades, a second checkout's tests) may hold the package manager's lock: wait for it
# (apt's own option, up to 10 minutes) instead of failing, which would skip the tests that need these packages.
apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
echo "Installing Debian's $packages for the tests"
# shellcheck disable=SC2086
$sudo "${apt[@]}" install $packages >/dev/null 2>&1 ||
  { $sudo "${apt[@]}" update >/dev/null 2>&1 && $sudo "${apt[@]}" install $packages >/dev/null 2>&1; } ||
  missing "apt-get install $packages failed"
