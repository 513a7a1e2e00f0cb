#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, helm) and the node's Kubernetes binaries (kubelet,
# kube-proxy) from the Go module proxy into the user cache, keyed by version.
# The node's runtime (containerd, crictl, CoreDNS) is build-node-binaries.sh.
#
# `go install k8s.io/kubernetes/cmd/...@v1.34.x` does not work: k8s.io/kubernetes
# carries `replace` lines for its staging modules, which `go install` refuses. A
# small wrapper module that requires k8s.io/kubernetes and repeats those replace
# lines (pointing at the published staging versions) is the known way.
#
# Prints the bin directory on stdout when done. Idempotent: returns at once when
# every binary is already there.
set -euo pipefail

K8S_VERSION="${KUBETUNE_K8S_VERSION:-v1.34.4}"
HELM_VERSION="${KUBETUNE_HELM_VERSION:-v3.19.0}"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
CACHE_ROOT="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
OUT="$CACHE_ROOT/testcluster/k8s-$K8S_VERSION-helm-$HELM_VERSION"
BIN="$OUT/bin"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy helm)
K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

all_present() {
  for b in "${BINARIES[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
}
if all_present; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { echo "build-binaries: 'go' is not on PATH; install Go >= 1.24" >&2; exit 1; }

export GOMODCACHE="${GOMODCACHE:-$CACHE_ROOT/go/mod}"
export GOCACHE="${GOCACHE:-$CACHE_ROOT/go/build}"
export GOFLAGS="-mod=mod"
export CGO_ENABLED=0
export GOTOOLCHAIN=local

work="$OUT/src"
mkdir -p "$work" "$BIN"
cd "$work"

# The staging modules are the `=> ./staging/...` lines of upstream's go.mod.
upstream_mod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$upstream_mod" | sort -u)
[[ ${#staging[@]} -gt 20 ]] || { echo "build-binaries: found only ${#staging[@]} staging modules in $upstream_mod" >&2; exit 1; }

{
  echo "module kubetune.local/testcluster"
  echo
  echo "go 1.24.0"
  echo
  echo "godebug default=go1.24"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $STAGING_VERSION"; done
  echo ")"
} > go.mod
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
# etcd: the version upstream pins (3.6.x); kube-apiserver 1.34 needs watch progress requests.
etcd_version=$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[0-9.]*\).*#\1#p' "$upstream_mod" | head -n1)
go get "go.etcd.io/etcd/server/v3@${etcd_version:-v3.6.4}" >&2
go mod tidy >&2

major=${K8S_VERSION#v}; major=${major%%.*}
minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
echo "build-binaries: building Kubernetes $K8S_VERSION and etcd ${etcd_version} into $BIN (a cold build takes 10-20 minutes on 2 cores)" >&2
# Only what is missing: a cache from before a binary was added keeps the others (linking is not cached).
missing=()
for c in "${K8S_COMMANDS[@]}"; do [[ -x "$BIN/$c" ]] || missing+=("k8s.io/kubernetes/cmd/$c"); done
if [[ ${#missing[@]} -gt 0 ]]; then go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${missing[@]}" >&2; fi
[[ -x "$BIN/etcd" ]] || go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2

# helm in a wrapper of its own: its dependency graph does not have to agree with Kubernetes'.
if all_present; then echo "$BIN"; exit 0; fi
hwork="$OUT/src-helm"
mkdir -p "$hwork"
cd "$hwork"
printf 'module kubetune.local/helm\n\ngo 1.24.0\n' > go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "helm.sh/helm/v3/cmd/helm"\n' > tools.go
go get "helm.sh/helm/v3@$HELM_VERSION" >&2
go mod tidy >&2
go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm >&2

all_present || { echo "build-binaries: some binaries are missing in $BIN" >&2; exit 1; }
echo "$BIN"
