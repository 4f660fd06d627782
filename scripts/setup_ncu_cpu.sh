#!/usr/bin/env bash
# Nsight Compute's command line from Debian's non-free nsight-compute packages, unpacked (not
# installed) into a cache folder, with the example reports that ship with it. On a machine without
# a GPU it cannot profile, but it reads reports: the test of the profile tool's report reading
# (`ncu --import --csv`) uses it. Idempotent. Prints two lines for `eval`:
#   export AVO_NCU=<ncu>  export AVO_NCU_REPORT=<an example .ncu-rep>
#
#   eval "$(scripts/setup_ncu_cpu.sh [DIR])"       DIR default: ~/.cache/avo/nsight-compute
set -euo pipefail

dir="${1:-${AVO_NCU_DIR:-$HOME/.cache/avo/nsight-compute}}"
step() { printf '[setup_ncu_cpu %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[setup_ncu_cpu] error: %s\n' "$*" >&2; exit 1; }

find_ncu() { find "$dir/root" -path '*/target/*' -name ncu -type f -perm -u+x 2>/dev/null | head -1; }
find_report() { find "$dir/root" -name '*.ncu-rep' 2>/dev/null | sort | head -1; }

if [[ -z "$(find_ncu)" || -z "$(find_report)" ]]; then
  command -v apt-get >/dev/null || die "apt-get not found: this script unpacks Debian's nsight-compute packages"
  step "downloading Debian's nsight-compute packages (non-free, about 350 MB) into $dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/lists/partial" "$tmp/debs" "$dir"
  # a private apt configuration: the machine's own sources and lists stay as they are
  . /etc/os-release
  cat > "$tmp/non-free.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${VERSION_CODENAME:-bookworm}
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt=(apt-get -qq -o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$tmp"
       -o Dir::State::Lists="$tmp/lists" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
  "${apt[@]}" update >&2 || die "apt-get update of the non-free source failed"
  (cd "$tmp/debs" && "${apt[@]}" download nsight-compute nsight-compute-target >&2) \
    || die "downloading nsight-compute failed"
  rm -rf "$dir/root.new"
  mkdir -p "$dir/root.new"
  for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir/root.new"
  done
  rm -rf "$dir/root.new/usr/lib/nsight-compute/host" "$dir/root.new/usr/lib/python3"  # the GUI: 370 MB
  rm -rf "$dir/root"
  mv "$dir/root.new" "$dir/root"
fi
ncu="$(find_ncu)"
report="$(find_report)"
[[ -n "$ncu" && -n "$report" ]] || die "no ncu or example report in $dir/root"
"$ncu" --version >/dev/null || die "$ncu does not run here"
step "ncu $("$ncu" --version | tail -1) at $ncu"
printf 'export AVO_NCU=%q\nexport AVO_NCU_REPORT=%q\n' "$ncu" "$report"
