#!/usr/bin/env bash
# The Debian packages a real test node needs: runc (the OCI runtime; crun fails
# on these hybrid-cgroup machines), the CNI plugins, iptables and conntrack
# (kube-proxy), busybox-static (the node's tool image), gcc's static libc (the
# pause image) and util-linux/iproute2 (nsenter, network namespaces).
# Idempotent: installs only what is missing, and touches apt not at all when
# nothing is. Needs root, as the node itself does.
set -euo pipefail

PACKAGES=(runc containernetworking-plugins iptables conntrack busybox-static libc6-dev gcc iproute2 util-linux procps)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "install-node-packages: missing ${missing[*]}; run as root (the test node needs root anyway)" >&2
  exit 1
fi
echo "install-node-packages: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
# Another apt (a parallel image build) may hold the lock for a while.
apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >&2
