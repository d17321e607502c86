#!/usr/bin/env bash
# Builds berth's two local images when they are missing or out of date:
#   berth-base:bookworm-node  Debian bookworm (debootstrap, minbase) with Debian's
#                             nodejs and node-sqlite3 and a user node (uid/gid 1000),
#                             imported with `docker import`, so no registry pull is needed.
#   berth-agent:latest        the reference agent, from container/agent/Dockerfile.
#
# The base root filesystem is cached as a tarball under $BERTH_CACHE_DIR/base-rootfs,
# keyed by a hash of its package list, so a wiped Docker engine re-imports it
# without running debootstrap again. The agent image carries a label with a hash
# of container/agent/* and the base image ID, and is rebuilt when that changes.
#
# Usage: bash container/build.sh [--quiet]
#   --quiet  send the output of debootstrap and docker build to log files and
#            print only progress lines
#
# Environment:
#   BERTH_CACHE_DIR      cache root (default: $HOME/.cache/berth)
#   BERTH_DEBIAN_MIRROR  Debian mirror for debootstrap (default: the bookworm
#                        entry of this host's apt sources)
set -euo pipefail
shopt -s inherit_errexit

readonly BASE_IMAGE=berth-base:bookworm-node
readonly AGENT_IMAGE=berth-agent:latest
readonly SUITE=bookworm
readonly BASE_PACKAGES=(nodejs node-sqlite3 ca-certificates tini)
# Bump when the root filesystem recipe below changes, so cached tarballs are rebuilt.
readonly BASE_RECIPE_VERSION=1
readonly BASE_HASH_LABEL=berth.base-hash
readonly AGENT_HASH_LABEL=berth.agent-source-hash

AGENT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/agent" && pwd)
CACHE_DIR=${BERTH_CACHE_DIR:-$HOME/.cache/berth}
readonly AGENT_DIR CACHE_DIR
QUIET=0
WORK_DIR=''

log() { printf 'build: %s\n' "$*" >&2; }
die() {
  printf 'build: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

# Runs "$@" as the step named $1 with its output in $CACHE_DIR/logs/$2.log:
# only there with --quiet, and also on stderr without it.
run_step() {
  local step=$1 log_name=$2
  shift 2
  local log_file=$CACHE_DIR/logs/$log_name.log started=$SECONDS
  log "$step (log: $log_file)"

  local status=0
  if ((QUIET)); then
    "$@" >"$log_file" 2>&1 || status=$?
  else
    "$@" 2>&1 | tee "$log_file" >&2 || status=$?
  fi
  if ((status != 0)); then
    ((QUIET)) && tail -n 20 "$log_file" >&2
    die "$step failed with exit code $status; see $log_file"
  fi
  log "$step took $((SECONDS - started))s"
}

# Prints the label $2 of image $1, or nothing when the image or label is missing.
image_label() {
  docker image inspect "$1" >/dev/null 2>&1 || return 0
  docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1"
}

# --- Debian mirror ---------------------------------------------------------

# Prints the first http(s) URI that this host's apt sources use for $SUITE.
debian_mirror_from_apt_sources() {
  local file
  for file in /etc/apt/sources.list.d/*.sources; do
    [[ -f $file ]] || continue
    # deb822 format: one stanza per paragraph, with Types, URIs and Suites fields.
    awk -v suite="$SUITE" '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) types = " " substr($i, 7) " "
          else if ($i ~ /^URIs:/) uris = substr($i, 6)
          else if ($i ~ /^Suites:/) suites = " " substr($i, 8) " "
          else if ($i ~ /^Enabled:/) enabled = substr($i, 9)
        }
        gsub(/[ \t]+/, " ", types); gsub(/[ \t]+/, " ", suites); gsub(/[ \t]/, "", enabled)
        if (enabled == "no" || types !~ / deb / || suites !~ (" " suite " ")) next
        count = split(uris, list, /[ \t]+/)
        for (j = 1; j <= count; j++) if (list[j] ~ /^https?:\/\//) { print list[j]; exit }
      }' "$file"
  done

  local list_files=()
  [[ -f /etc/apt/sources.list ]] && list_files+=(/etc/apt/sources.list)
  for file in /etc/apt/sources.list.d/*.list; do
    [[ -f $file ]] && list_files+=("$file")
  done
  ((${#list_files[@]} > 0)) || return 0
  # One-line format: deb [options] URI suite components...
  sed -e 's/\[[^]]*\]//' "${list_files[@]}" |
    awk -v suite="$SUITE" '$1 == "deb" && $3 == suite && $2 ~ /^https?:\/\// { print $2 }'
}

debian_mirror() {
  if [[ -n ${BERTH_DEBIAN_MIRROR:-} ]]; then
    echo "$BERTH_DEBIAN_MIRROR"
    return 0
  fi
  local mirror
  mirror=$(debian_mirror_from_apt_sources)
  mirror=${mirror%%$'\n'*}
  [[ -n $mirror ]] ||
    die "no Debian mirror for $SUITE found in /etc/apt/sources.list or /etc/apt/sources.list.d; set BERTH_DEBIAN_MIRROR to a mirror URL"
  echo "$mirror"
}

# --- base image ------------------------------------------------------------

base_hash() {
  printf '%s\n' "recipe=$BASE_RECIPE_VERSION" "suite=$SUITE" "variant=minbase" "${BASE_PACKAGES[@]}" |
    sha256sum | cut -c1-16
}

# Unmounts whatever is still mounted inside the work directory (proc, or what
# a failed debootstrap left), keeps debootstrap's own log, then deletes the
# directory without crossing into other file systems.
cleanup_work_dir() {
  [[ -n $WORK_DIR && -d $WORK_DIR ]] || return 0
  local mount_point
  while read -r mount_point; do
    umount -l "$mount_point"
  done < <(awk -v root="$WORK_DIR/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r)
  if [[ -f $WORK_DIR/rootfs/debootstrap/debootstrap.log ]]; then
    cp "$WORK_DIR/rootfs/debootstrap/debootstrap.log" "$CACHE_DIR/logs/debootstrap-details.log"
  fi
  rm -rf --one-file-system "$WORK_DIR"
  WORK_DIR=''
}

ensure_debootstrap() {
  command -v debootstrap >/dev/null 2>&1 && return 0
  run_step "installing debootstrap with apt-get" apt-debootstrap \
    bash -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap'
}

# Installs BASE_PACKAGES with apt inside the root filesystem. debootstrap's
# own --include resolves dependencies poorly (node-sqlite3 pulls in dozens of
# node-* packages), so apt does this step. Returns on the first failure
# because run_step calls it where errexit does not apply.
install_base_packages() {
  local rootfs=$1
  mount -t proc proc "$rootfs/proc" || return
  chroot "$rootfs" apt-get update || return
  DEBIAN_FRONTEND=noninteractive chroot "$rootfs" \
    apt-get install -y --no-install-recommends "${BASE_PACKAGES[@]}" || return
  chroot "$rootfs" apt-get clean || return
  umount "$rootfs/proc"
}

add_node_user() {
  local rootfs=$1
  chroot "$rootfs" groupadd --gid 1000 node
  chroot "$rootfs" useradd --uid 1000 --gid 1000 --create-home --home-dir /home/node --shell /bin/bash node
  mkdir -p "$rootfs/workspace" "$rootfs/app"
  chown 1000:1000 "$rootfs/workspace"
}

# Removes package lists and caches (derived images run `apt-get update` before
# installing), documentation other than copyright files, translations, and the
# host's resolv.conf that debootstrap copied in (Docker provides its own at run
# time). A dpkg configuration keeps packages that derived images install from
# adding documentation back.
slim_rootfs() {
  local rootfs=$1
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log "$rootfs"/tmp/*
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -f "$rootfs/etc/resolv.conf"

  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/berth-slim" <<'EOF'
# Written by berth's container/build.sh: containers need no manuals or translations.
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
EOF
}

build_rootfs_tarball() {
  local tarball=$1
  ((EUID == 0)) ||
    die "building $BASE_IMAGE runs debootstrap, which needs root: run 'sudo bash container/build.sh', or provide an image tagged $BASE_IMAGE"
  ensure_debootstrap

  local mirror
  mirror=$(debian_mirror)
  WORK_DIR=$(mktemp -d "$CACHE_DIR/base-rootfs/work.XXXXXX")
  trap cleanup_work_dir EXIT

  local rootfs=$WORK_DIR/rootfs
  run_step "debootstrap $SUITE minbase (a few minutes)" debootstrap \
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror"
  run_step "installing ${BASE_PACKAGES[*]} into the root filesystem" base-packages \
    install_base_packages "$rootfs"
  add_node_user "$rootfs"
  slim_rootfs "$rootfs"

  run_step "packing the root filesystem" rootfs-tar \
    tar --numeric-owner -C "$rootfs" -cf "$WORK_DIR/rootfs.tar" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' .
  mv "$WORK_DIR/rootfs.tar" "$tarball"
  cleanup_work_dir
  trap - EXIT
}

ensure_base_image() {
  local hash
  hash=$(base_hash)
  [[ $(image_label "$BASE_IMAGE" "$BASE_HASH_LABEL") == "$hash" ]] && return 0

  local tarball=$CACHE_DIR/base-rootfs/$hash.tar
  [[ -f $tarball ]] || build_rootfs_tarball "$tarball"

  run_step "importing $BASE_IMAGE from $tarball" base-import \
    docker import \
    --change "LABEL $BASE_HASH_LABEL=$hash" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    --message "berth base: debootstrap $SUITE minbase with ${BASE_PACKAGES[*]}" \
    "$tarball" "$BASE_IMAGE"
}

# --- agent image -----------------------------------------------------------

agent_hash() {
  {
    (cd "$AGENT_DIR" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    docker image inspect --format '{{.Id}}' "$BASE_IMAGE"
  } | sha256sum | cut -c1-16
}

# Deletes image $1 when a rebuild has left it without a tag. An image that a
# container or a derived image still uses is kept.
remove_untagged_image() {
  local image_id=$1
  [[ -n $image_id ]] || return 0
  docker image inspect "$image_id" >/dev/null 2>&1 || return 0
  [[ $(docker image inspect --format '{{len .RepoTags}}' "$image_id") == 0 ]] || return 0
  local output
  if ! output=$(docker image rm "$image_id" 2>&1); then
    log "kept the previous $AGENT_IMAGE image $image_id: ${output//$'\n'/ }"
  fi
}

ensure_agent_image() {
  local hash
  hash=$(agent_hash)
  [[ $(image_label "$AGENT_IMAGE" "$AGENT_HASH_LABEL") == "$hash" ]] && return 0

  local previous_id=''
  if docker image inspect "$AGENT_IMAGE" >/dev/null 2>&1; then
    previous_id=$(docker image inspect --format '{{.Id}}' "$AGENT_IMAGE")
  fi
  run_step "building $AGENT_IMAGE from $AGENT_DIR" agent-build \
    docker build \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "$AGENT_HASH_LABEL=$hash" \
    --tag "$AGENT_IMAGE" \
    "$AGENT_DIR"
  remove_untagged_image "$previous_id"
}

main() {
  while (($# > 0)); do
    case $1 in
      --quiet) QUIET=1 ;;
      -h | --help)
        usage
        return 0
        ;;
      *)
        usage
        die "unknown argument: $1"
        ;;
    esac
    shift
  done

  docker info >/dev/null 2>&1 ||
    die "the Docker engine is not reachable ('docker info' failed); start it, or run 'bash scripts/provision.sh', which starts it"
  mkdir -p "$CACHE_DIR/logs" "$CACHE_DIR/base-rootfs" "$CACHE_DIR/locks"

  # One build at a time: a second caller waits, then finds the images in place.
  exec 9>"$CACHE_DIR/locks/images.lock"
  flock 9

  ensure_base_image
  ensure_agent_image
}

main "$@"
