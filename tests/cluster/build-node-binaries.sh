#!/usr/bin/env bash
# Build the node's runtime (containerd 2.x with its runc shim and ctr, crictl,
# CoreDNS) from the Go module proxy into the user cache, keyed by version.
# kubelet, kube-proxy and kube-scheduler come from build-binaries.sh (the same
# wrapper module, hence the same version, as the control plane).
#
# None of these modules carries `replace` lines, so plain `go install
# module/cmd@version` works. Everything is static (CGO_ENABLED=0): containerd
# without the btrfs, devmapper and zfs snapshotters (cgo); overlayfs and native
# are what the node uses.
#
#   build-node-binaries.sh          the node runtime; prints its bin directory
#   build-node-binaries.sh kueue    Kueue's manager and its manifests' sources (own directory, printed)
#
# Idempotent: returns at once when every binary is already there.
set -euo pipefail

CONTAINERD_VERSION="${KUBETUNE_CONTAINERD_VERSION:-v2.4.2}"
CRICTL_VERSION="${KUBETUNE_CRICTL_VERSION:-v1.34.0}"
COREDNS_VERSION="${KUBETUNE_COREDNS_VERSION:-v1.12.1}"   # what Kubernetes 1.34 ships
KUEUE_VERSION="${KUBETUNE_KUEUE_VERSION:-v0.17.0}"
CACHE_ROOT="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"

what="${1:-node}"
case "$what" in
  node)
    BIN="$CACHE_ROOT/testcluster/node-containerd-$CONTAINERD_VERSION-crictl-$CRICTL_VERSION-coredns-$COREDNS_VERSION/bin"
    BINARIES=(containerd containerd-shim-runc-v2 ctr crictl coredns) ;;
  kueue)
    BIN="$CACHE_ROOT/testcluster/kueue-$KUEUE_VERSION/bin"
    BINARIES=(kueue ../config/default/kustomization.yaml) ;;
  *) echo "build-node-binaries: unknown set '$what' (node or kueue)" >&2; exit 2 ;;
esac

all_present() {
  for b in "${BINARIES[@]}"; do [[ -e "$BIN/$b" ]] || return 1; done
}
if all_present; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { echo "build-node-binaries: 'go' is not on PATH; install Go >= 1.26" >&2; exit 1; }

export GOMODCACHE="${GOMODCACHE:-$CACHE_ROOT/go/mod}"
export GOCACHE="${GOCACHE:-$CACHE_ROOT/go/build}"
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0
export GOTOOLCHAIN=local
export GOBIN="$BIN"
mkdir -p "$BIN"
cd "$BIN"

if [[ "$what" == kueue ]]; then
  echo "build-node-binaries: building Kueue $KUEUE_VERSION into $BIN (a cold build takes about 10 CPU-minutes)" >&2
  go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" >&2
  # Its install manifests (kustomize sources: CRDs, RBAC, webhooks, the Deployment) ship in the module.
  rm -rf "$BIN/../config"
  cp -r "$(go env GOMODCACHE)/sigs.k8s.io/kueue@$KUEUE_VERSION/config" "$BIN/../config"
  chmod -R u+w "$BIN/../config"
else
  echo "build-node-binaries: building containerd $CONTAINERD_VERSION, crictl $CRICTL_VERSION and CoreDNS $COREDNS_VERSION into $BIN (a cold build takes about 5 minutes on 2 cores)" >&2
  go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" >&2
  go install -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
    "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2
  go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION" >&2
fi

all_present || { echo "build-node-binaries: some binaries are missing in $BIN" >&2; exit 1; }
echo "$BIN"
