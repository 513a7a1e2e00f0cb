#!/usr/bin/env bash
# Build the project's container images with podman, on a machine where no
# container registry is reachable, and save them as archives that containerd
# imports (`ctr -n k8s.io images import <archive>`).
#
#   tests/cluster/images.sh [operator] [trainer]   build (default: both)
#   tests/cluster/images.sh check                    restricted-run smoke checks
#   tests/cluster/images.sh refs                     the image names, building nothing
#   tests/cluster/images.sh podman ARGS...           podman with the project's config
#
# (The node's pod sandbox image, pause, is not built here: tests/cluster/node/images.py
# writes it, with the node's other small images, as an OCI archive in milliseconds.)
#
# Prints one line per image on stdout: `<name> <image ref> <archive path>`;
# progress goes to stderr. Idempotent and quick when nothing changed: each
# archive is named by a hash of everything that goes into its image (Dockerfile,
# pyproject.toml, the sources, the base, the build commands), so a warm run runs
# no podman at all.
#
# What it sets up on a fresh machine (as root):
# - podman, runc, debootstrap and gcc from Debian (apt-get), if missing;
# - a project-local podman configuration under the cache (nothing in /etc is
#   edited): runc, cgroupfs, default ulimits nofile/nproc 4096 (crun fails on
#   hybrid-cgroup VMs; no CAP_SYS_RESOURCE for higher limits), storage under
#   the cache;
# - the base image: Debian bookworm (debootstrap, minbase) with python3 and its
#   venv module, imported into podman — the public python slim image cannot be
#   pulled here. The Dockerfile takes it through the PYTHON_IMAGE build arg;
# - the host's CA bundle reaches pip only as a build secret (never a layer);
#   pip's cache is a build cache mount kept under the cache folder (it stays
#   empty where the package index's responses carry no cache headers, as behind
#   this machine's proxy: then the layer cache alone makes rebuilds fast).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE_ROOT="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
ROOT="$CACHE_ROOT/images"
ARCHIVES="$ROOT/archives"
PODMAN_DIR="$ROOT/podman"
# The image names, here only: tests/cluster/images.py asks `images.sh refs`.
OPERATOR_REF="localhost/kubetune-operator:dev"
TRAINER_REF="localhost/kubetune-trainer:dev"
BASE_REPO="localhost/kubetune-base"
DEBIAN_SUITE="bookworm"
DEBIAN_MIRROR="${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"
CA_BUNDLE="${KUBETUNE_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

BUILT=""

log() { echo "images: $*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s; }
hash_stdin() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- host set-up
ensure_tools() {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  [[ -x /usr/sbin/runc ]] || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v gcc >/dev/null || missing+=(gcc)
  [[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/aarch64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# A project-local podman: CONTAINERS_CONF and CONTAINERS_STORAGE_CONF point at
# files under the cache; TMPDIR is where buildah keeps RUN --mount=type=cache.
setup_podman() {
  mkdir -p "$PODMAN_DIR" "$ROOT/tmp" "$ARCHIVES"
  local run_dir=/run/kubetune-podman
  [[ -w /run ]] || run_dir="${XDG_RUNTIME_DIR:-/tmp}/kubetune-podman"
  write_if_changed "$PODMAN_DIR/containers.conf" <<EOF
# Written by tests/cluster/images.sh.
[containers]
# No CAP_SYS_RESOURCE on these machines: limits above the host's hard limit fail.
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]

[engine]
# crun fails on hybrid (v1 + v2) cgroup machines; runc and cgroupfs work.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$run_dir/libpod"
EOF
  write_if_changed "$PODMAN_DIR/storage.conf" <<EOF
# Written by tests/cluster/images.sh.
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/storage"
runroot = "$run_dir/storage"
EOF
  export CONTAINERS_CONF="$PODMAN_DIR/containers.conf"
  export CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf"
  export TMPDIR="$ROOT/tmp"
}

write_if_changed() {
  local file=$1 content
  content=$(cat)
  [[ -f $file && "$(cat "$file")" == "$content" ]] && return 0
  printf '%s\n' "$content" > "$file"
}

# ---------------------------------------------------------------- base image
base_ref() {
  local key
  key=$(printf '%s\n' "v1 $DEBIAN_SUITE minbase $BASE_PACKAGES" | hash_stdin)
  echo "$BASE_REPO:$DEBIAN_SUITE-$key"
}

ensure_base() {
  local ref=$1 rootfs t0
  podman image exists "$ref" && return 0
  t0=$(now)
  rootfs=$(mktemp -d "$ROOT/tmp/rootfs.XXXXXX")
  log "building the base image $ref (debootstrap $DEBIAN_SUITE + $BASE_PACKAGES; a few minutes)"
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$ROOT/tmp/debootstrap.log" 2>&1; then
    tail -n 20 "$ROOT/tmp/debootstrap.log" >&2
    rm -rf "$rootfs"
    die "debootstrap failed (log: $ROOT/tmp/debootstrap.log)"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --quiet - "$ref" >/dev/null
  rm -rf "$rootfs"
  log "base image $ref built in $(($(now) - t0)) s"
}

# ---------------------------------------------------------------- project images
# Everything the Dockerfile copies (see .dockerignore), the Dockerfile, the base
# and the build recipe (the functions below as bash sees them: comments aside).
sources_key() {
  local base=$1
  {
    echo "$base"
    declare -f build_target save_archive
    cd "$REPO"
    find Dockerfile .dockerignore pyproject.toml README.md operator trainer \
      -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -path '*.egg-info/*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
  } | hash_stdin
}

# build_target NAME REF TARGET BASE KEY: podman build, then podman save to the
# archive for KEY (skipped entirely when that archive exists).
build_target() {
  local name=$1 ref=$2 target=$3 base=$4 key=$5
  local archive="$ARCHIVES/$name-$key.tar" t0 secret=()
  if [[ -f $archive ]]; then echo "$name $ref $archive"; return 0; fi
  [[ -f $CA_BUNDLE ]] && secret=(--secret "id=cacert,src=$CA_BUNDLE")
  ensure_base "$base"
  t0=$(now)
  log "building $ref (--target $target)"
  podman build --pull=never --network=host --layers \
    --build-arg "PYTHON_IMAGE=$base" "${secret[@]}" \
    --label "io.kubetune.sources=$key" \
    --target "$target" -t "$ref" -f "$REPO/Dockerfile" "$REPO" >"$ROOT/tmp/build-$name.log" 2>&1 \
    || { tail -n 30 "$ROOT/tmp/build-$name.log" >&2; die "building $ref failed (log: $ROOT/tmp/build-$name.log)"; }
  log "$ref built in $(($(now) - t0)) s"
  BUILT=1
  save_archive "$name" "$ref" "$archive"
}

save_archive() {
  local name=$1 ref=$2 archive=$3 t0
  t0=$(now)
  rm -f "$archive.part"
  podman save --quiet --format docker-archive -o "$archive.part" "$ref" >/dev/null
  mv "$archive.part" "$archive"
  # Keep one archive per image (the trainer's is gigabytes), and no interrupted saves.
  find "$ARCHIVES" -maxdepth 1 -name "$name-*.tar*" ! -path "$archive" -delete
  log "$ref saved in $(($(now) - t0)) s: $archive ($(du -h "$archive" | cut -f1))"
  echo "$name $ref $archive"
}

# ---------------------------------------------------------------- smoke checks
# The chart's restricted securityContext, as podman flags: uid 65532, read-only
# root, no capabilities, no-new-privileges, no network. Writable: /tmp only, as
# in the operator's and the trainer's pods (HOME stays read-only, as there).
restricted() {
  podman run --rm --network=none --read-only --user 65532:65532 --cap-drop=ALL \
    --security-opt=no-new-privileges --tmpfs /tmp:rw,size=1g "$@"
}

check() {
  local scratch t0
  log "both images: uid, read-only root, capabilities; operator image: kubetune --help, kubetune operator --help"
  restricted --entrypoint kubetune "$OPERATOR_REF" --help >/dev/null
  restricted "$OPERATOR_REF" --help >/dev/null
  local ref
  for ref in "$OPERATOR_REF" "$TRAINER_REF"; do
    restricted --entrypoint sh "$ref" -c '
      test "$(id -u)" = 65532 && awk "\$2 == \"/\" { print \$4 }" /proc/mounts | grep -q "^ro," \
        && ! touch "$HOME/probe" 2>/dev/null \
        && grep -q "^CapBnd:.0000000000000000" /proc/self/status && grep -q "^NoNewPrivs:.1" /proc/self/status' \
      || die "$ref does not run restricted (uid 65532, read-only root and HOME, no capabilities, no-new-privileges)"
  done
  log "trainer image: kubetune-trainer --help; a tiny model and a short fine-tune of it"
  restricted "$TRAINER_REF" --help >/dev/null
  # The scratch emptyDir of a training pod: HF_HOME and TMPDIR point into it.
  scratch=$(mktemp -d "$ROOT/tmp/check.XXXXXX")
  chmod 0777 "$scratch"
  t0=$(now)
  restricted -v "$REPO/docs/examples:/examples:ro" -v "$scratch:/scratch:rw" -w /scratch \
    -e TMPDIR=/scratch/tmp -e HF_HOME=/scratch/hf --entrypoint sh "$TRAINER_REF" -c '
      set -e
      mkdir -p /scratch/tmp docs
      ln -s /examples docs/examples
      python -m kubetune_trainer.tiny --out .kubetune/demo/base-model --corpus docs/examples/data/support/train.jsonl \
        --pretrain-steps 20
      # The quickstart manifest on the tiny model (the demo'"'"'s SmolLM2 is not in the image):
      # 20 pretraining steps, 2 epochs, 24 eval examples, every block adapted (the tiny model
      # has fewer blocks than the lastLayers of the manifest). This checks the image, not the
      # model: exit 0 (gates passed) or 11 (trained and published, gates failed) both mean
      # every stage ran.
      head -n 24 docs/examples/data/support/heldout.jsonl > eval.jsonl
      python -c "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); s = d[\"spec\"]; s[\"training\"][\"epochs\"] = 2; \
        s[\"baseModel\"][\"uri\"] = \"file://./.kubetune/demo/base-model\"; \
        s[\"dataset\"][\"eval\"] = \"file://./eval.jsonl\"; \
        s[\"method\"][\"lora\"].pop(\"lastLayers\", None); yaml.safe_dump(d, open(\"finetune.yaml\", \"w\"))" \
        docs/examples/finetune-local.yaml
      kubetune run finetune.yaml || test $? -eq 11
      python -c "import glob, json; [m] = glob.glob(\".kubetune/runs/local/support-router/*/manifest.json\"); \
        d = json.load(open(m)); print(\"published\", d[\"artifact\"][\"digest\"], \"promotable:\", d[\"promotable\"])"' >&2 \
    || { rm -rf "$scratch"; die "the fine-tune in $TRAINER_REF failed"; }
  rm -rf "$scratch"
  log "restricted checks passed (fine-tune: $(($(now) - t0)) s)"
}

# ---------------------------------------------------------------- main
main() {
  local targets=("$@") base key
  if [[ ${1:-} == podman ]]; then
    setup_podman
    shift
    exec podman "$@"
  fi
  [[ ${#targets[@]} -gt 0 ]] || targets=(operator trainer)
  case ${targets[*]} in
    refs)
      printf 'operator %s\ntrainer %s\n' "$OPERATOR_REF" "$TRAINER_REF"
      return
      ;;
    check)
      setup_podman
      # The images the archives hold (podman's own tags may be of another build).
      local name ref archive key built
      built=$(main operator trainer)
      while read -r name ref archive; do
        key=${archive##*-}
        key=${key%.tar}
        [[ "$(podman image inspect --format '{{index .Labels "io.kubetune.sources"}}' "$ref" 2>/dev/null)" == "$key" ]] \
          || podman load --quiet -i "$archive" >/dev/null
      done <<<"$built"
      check
      return
      ;;
  esac
  mkdir -p "$ROOT"
  exec 9>"$ROOT/lock"
  flock 9
  ensure_tools
  setup_podman
  base=$(base_ref)
  key=""
  for t in "${targets[@]}"; do
    case $t in
      operator | trainer)
        [[ -n $key ]] || key=$(sources_key "$base")
        build_target "$t" "$([[ $t == operator ]] && echo "$OPERATOR_REF" || echo "$TRAINER_REF")" "$t" "$base" "$key"
        ;;
      *) die "unknown image '$t' (operator, trainer, check, refs, podman ...)" ;;
    esac
  done
  # Untagged leftovers of earlier builds (after a pyproject.toml change, a
  # gigabytes-large dependency layer); the layers of the tagged images stay.
  if [[ -n $BUILT ]]; then podman image prune --force >/dev/null; fi
}

main "$@"
