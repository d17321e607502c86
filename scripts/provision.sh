#!/usr/bin/env bash
# Installs and caches the host tools berth needs: a running Docker engine, the
# Temporal CLI, the Temporal Java test server (skipped with --runtime) and the
# local images from container/build.sh. Writes their paths to
# $BERTH_CACHE_DIR/executables.json, which src/provision/executables.ts reads.
#
# Safe to run again: each step checks its cached result first and prints
# nothing when everything is in place. Progress goes to stderr.
#
# Usage: bash scripts/provision.sh [--runtime]
#   --runtime  skip the test server (what `npm start` needs)
#
# Environment:
#   BERTH_CACHE_DIR      cache root (default: $HOME/.cache/berth)
#   BERTH_TEMPORAL_CLI   use this Temporal CLI instead of one on PATH or a cached build
#   BERTH_DEBIAN_MIRROR  Debian mirror for the base image (default: read from apt sources)
set -euo pipefail
shopt -s inherit_errexit

readonly TEMPORAL_CLI_VERSION=v1.5.1
readonly TEMPORAL_CLI_MODULE=github.com/temporalio/cli/cmd/temporal
readonly TEST_SERVER_VERSION=1.38.0
readonly DOCKER_START_TIMEOUT_SECONDS=60

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${BERTH_CACHE_DIR:-$HOME/.cache/berth}
readonly PROJECT_DIR CACHE_DIR

log() { printf 'provision: %s\n' "$*" >&2; }
die() {
  printf 'provision: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
}

# Runs "$@" while holding an exclusive lock on $CACHE_DIR/locks/$1.lock, so two
# provisions running at once do not build the same thing twice.
with_lock() {
  local name=$1
  shift
  mkdir -p "$CACHE_DIR/locks"
  (
    flock 9
    "$@"
  ) 9>"$CACHE_DIR/locks/$name.lock"
}

# Prints a JSON string literal for $1 (paths only, so escaping \ and " is enough).
json_string() {
  local value=${1//\\/\\\\}
  printf '"%s"' "${value//\"/\\\"}"
}

# --- Docker engine ---------------------------------------------------------

docker_answers() { docker info >/dev/null 2>&1; }

install_docker_engine() {
  log "installing Debian's docker.io with apt-get (log: $CACHE_DIR/logs/apt-docker.log)"
  {
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
  } >"$CACHE_DIR/logs/apt-docker.log" 2>&1 ||
    die "apt-get install docker.io failed; see $CACHE_DIR/logs/apt-docker.log"
}

# Starts dockerd in a session of its own with only stdin, stdout and stderr
# open, so that it holds neither with_lock's lock nor a pipe that the caller of
# this script waits on.
launch_dockerd() {
  local log_file=$1
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then
        eval "exec $fd>&-"
      fi
    done
    exec setsid dockerd </dev/null >>"$log_file" 2>&1
  ) &
}

start_docker_engine() {
  docker_answers && return 0

  if ! command -v dockerd >/dev/null 2>&1; then
    install_docker_engine
  fi
  if ! pgrep -x dockerd >/dev/null; then
    log "starting dockerd in the background (log: $CACHE_DIR/logs/dockerd.log)"
    launch_dockerd "$CACHE_DIR/logs/dockerd.log"
  fi

  local waited=0
  until docker_answers; do
    ((waited < DOCKER_START_TIMEOUT_SECONDS)) ||
      die "timed out after ${DOCKER_START_TIMEOUT_SECONDS}s waiting for dockerd to accept connections; see $CACHE_DIR/logs/dockerd.log"
    sleep 1
    waited=$((waited + 1))
  done
  log "Docker engine is up"
}

ensure_docker() {
  docker_answers && return 0

  if ((EUID != 0)); then
    die "the Docker engine is not reachable ('docker info' failed). Start it (for example 'sudo systemctl start docker', or run 'sudo dockerd' in another terminal), make sure your user may use /var/run/docker.sock, then run this script again."
  fi
  command -v docker >/dev/null 2>&1 || install_docker_engine
  with_lock docker start_docker_engine
}

# --- Temporal CLI ----------------------------------------------------------

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then
    echo /usr/local/go/bin/go
  else
    die "the Temporal CLI is not on PATH and Go is missing, so it cannot be built. Install Go 1.23 or newer, or put 'temporal' on PATH, or set BERTH_TEMPORAL_CLI."
  fi
}

build_temporal_cli() {
  local binary=$1
  [[ -x $binary ]] && return 0

  local go_binary staging log_file
  go_binary=$(find_go)
  staging=$(mktemp -d "$CACHE_DIR/temporal-cli/build.XXXXXX")
  log_file=$CACHE_DIR/logs/temporal-cli-build.log
  log "building the Temporal CLI $TEMPORAL_CLI_VERSION with Go; this takes several minutes (log: $log_file)"

  local started=$SECONDS
  if ! GOBIN=$staging "$go_binary" install -ldflags='-s -w' "$TEMPORAL_CLI_MODULE@$TEMPORAL_CLI_VERSION" >"$log_file" 2>&1; then
    rm -rf "$staging"
    die "building the Temporal CLI failed; see $log_file"
  fi
  mkdir -p "$(dirname "$binary")"
  mv "$staging/temporal" "$binary"
  rm -rf "$staging"
  log "built the Temporal CLI in $((SECONDS - started))s: $binary"
}

# Prints the absolute path of the Temporal CLI, building it into the cache when needed.
ensure_temporal_cli() {
  if [[ -n ${BERTH_TEMPORAL_CLI:-} ]]; then
    [[ -x $BERTH_TEMPORAL_CLI ]] || die "BERTH_TEMPORAL_CLI=$BERTH_TEMPORAL_CLI is not an executable file"
    realpath "$BERTH_TEMPORAL_CLI"
    return 0
  fi
  if command -v temporal >/dev/null 2>&1; then
    realpath "$(command -v temporal)"
    return 0
  fi

  local binary=$CACHE_DIR/temporal-cli/$TEMPORAL_CLI_VERSION/temporal
  if [[ ! -x $binary ]]; then
    mkdir -p "$CACHE_DIR/temporal-cli"
    with_lock temporal-cli build_temporal_cli "$binary"
  fi
  echo "$binary"
}

# --- Temporal test server --------------------------------------------------

write_test_server_pom() {
  cat >"$1/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>berth.provision</groupId>
  <artifactId>temporal-test-server-deps</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>io.temporal</groupId>
      <artifactId>temporal-test-server</artifactId>
      <version>$TEST_SERVER_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

install_test_server() {
  local dir=$1 wrapper=$2
  [[ -x $wrapper ]] && return 0

  command -v mvn >/dev/null 2>&1 || die "Maven (mvn) is missing; install it (apt-get install maven) to fetch the Temporal test server"
  local java_binary
  java_binary=$(command -v java) || die "Java is missing; install a JRE 11 or newer (apt-get install openjdk-17-jre-headless) to run the Temporal test server"

  local staging log_file
  staging=$(mktemp -d "$CACHE_DIR/temporal-test-server/fetch.XXXXXX")
  log_file=$CACHE_DIR/logs/test-server-fetch.log
  log "fetching the Temporal test server $TEST_SERVER_VERSION with Maven (log: $log_file)"

  write_test_server_pom "$staging"
  if ! mvn -B -q -f "$staging/pom.xml" dependency:copy-dependencies -DoutputDirectory="$staging/lib" >"$log_file" 2>&1; then
    rm -rf "$staging"
    die "fetching the Temporal test server failed; see $log_file"
  fi

  rm -rf "$dir"
  mkdir -p "$dir"
  mv "$staging/lib" "$dir/lib"
  rm -rf "$staging"
  cat >"$wrapper.tmp" <<EOF
#!/usr/bin/env bash
# Starts the Temporal Java test server $TEST_SERVER_VERSION; the first argument is the port.
exec $(printf '%q' "$java_binary") -cp $(printf '%q' "$dir/lib")'/*' io.temporal.testserver.TestServer "\$@"
EOF
  chmod +x "$wrapper.tmp"
  mv "$wrapper.tmp" "$wrapper"
  log "installed the Temporal test server: $wrapper"
}

# Prints the absolute path of the test server wrapper, fetching the jars when needed.
ensure_test_server() {
  local dir=$CACHE_DIR/temporal-test-server/$TEST_SERVER_VERSION
  local wrapper=$dir/temporal-test-server
  if [[ ! -x $wrapper ]]; then
    mkdir -p "$CACHE_DIR/temporal-test-server"
    with_lock test-server install_test_server "$dir" "$wrapper"
  fi
  echo "$wrapper"
}

# --- executables.json ------------------------------------------------------

write_executables_json() {
  local temporal_cli=$1 test_server=$2
  local target=$CACHE_DIR/executables.json
  local test_server_json=null
  [[ -n $test_server ]] && test_server_json=$(json_string "$test_server")

  local content
  content=$(printf '{\n  "temporalCli": %s,\n  "testServer": %s\n}' "$(json_string "$temporal_cli")" "$test_server_json")
  if [[ -f $target && "$(cat "$target")" == "$content" ]]; then
    return 0
  fi
  printf '%s\n' "$content" >"$target.tmp.$$"
  mv "$target.tmp.$$" "$target"
}

main() {
  local runtime_only=0
  while (($# > 0)); do
    case $1 in
      --runtime) runtime_only=1 ;;
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

  mkdir -p "$CACHE_DIR/logs"
  ensure_docker

  local temporal_cli test_server=''
  temporal_cli=$(ensure_temporal_cli)
  if ((runtime_only)); then
    # Keep a test server that an earlier full provision installed, so that
    # `npm start` does not hide it from a later `vitest run`.
    local cached_wrapper=$CACHE_DIR/temporal-test-server/$TEST_SERVER_VERSION/temporal-test-server
    [[ -x $cached_wrapper ]] && test_server=$cached_wrapper
  else
    test_server=$(ensure_test_server)
  fi

  BERTH_CACHE_DIR=$CACHE_DIR bash "$PROJECT_DIR/container/build.sh" --quiet
  write_executables_json "$temporal_cli" "$test_server"
}

main "$@"
