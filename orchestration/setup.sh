#!/usr/bin/env bash
# Idempotent set-up of everything FLEAD runs on, from the project's own files.
# Each step is skipped when its stamp (a hash of the step's inputs) matches, so a second run downloads nothing.
# Caches live under the user's home: pip (~/.cache/pip), Maven (~/.m2), Go (~/go/pkg/mod, ~/.cache/go-build).
#
#   bash orchestration/setup.sh            # everything
#   bash orchestration/setup.sh core       # without Superset and the browser (enough for most tests)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=$ROOT/build
STAMPS=$BUILD/stamps
mkdir -p "$STAMPS" "$BUILD/bin"
WHAT=${1:-all}
PYTHON=${FLEAD_PYTHON:-python3}

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
fresh() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
mark() { echo "$2" > "$STAMPS/$1"; }

# --- early checks -----------------------------------------------------------------------------------------
free_mb=$(df -Pm "$ROOT" | awk 'NR==2 {print $4}')
[ "${free_mb:-0}" -ge 4000 ] || die "only ${free_mb} MB free under $ROOT; set-up needs about 4 GB (venvs, jars, build)"
command -v java >/dev/null || die "Java 17+ is required (apt-get install openjdk-17-jdk-headless) and was not found on PATH"
java_major=$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1])}')
[ "${java_major:-0}" -ge 17 ] || die "Java 17+ is required; found Java ${java_major} ($(command -v java))"
$PYTHON -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' \
  || die "Python 3.10-3.12 is required for apache-flink 2.2.1; found $($PYTHON --version 2>&1) (set FLEAD_PYTHON)"

# --- Python virtualenv ------------------------------------------------------------------------------------
key=$(stamp_of pyproject.toml)
if ! fresh venv "$key" || [ ! -x .venv/bin/python ]; then
  say "virtualenv .venv (apache-flink, pyspark, confluent-kafka, pymongo, numpy, test tools)"
  [ -x .venv/bin/python ] || $PYTHON -m venv .venv
  .venv/bin/pip install -q --upgrade pip setuptools wheel || die "pip could not reach PyPI to upgrade itself"
  .venv/bin/pip install -q -e ".[test]" || die "pip install failed (see the lines above)"
  mark venv "$key"
fi

# --- JVM jars from Maven Central: the Kafka broker and the Flink Kafka connector -------------------------
command -v mvn >/dev/null || die "Maven (mvn) is required to fetch the Kafka broker jars (apt-get install maven)"
for part in kafka:kafka-libs flink_jobs:flink-libs; do
  dir=${part%%:*}; out=$BUILD/${part##*:}
  key=$(stamp_of "$dir/pom.xml")
  if ! fresh "jars-$dir" "$key" || [ -z "$(ls "$out" 2>/dev/null)" ]; then
    say "jars for $dir/pom.xml -> build/${part##*:}"
    rm -rf "$out"
    mvn -q -B dependency:copy-dependencies -f "$dir/pom.xml" -DoutputDirectory="$out" \
      || die "Maven could not resolve $dir/pom.xml (is Maven Central reachable?)"
    mark "jars-$dir" "$key"
  fi
done

# --- Flink: patched classes of flink-python's Beam (flink_jobs/beam-patches; flink_jobs/binding.py explains) -----
flink_python_jar=$(ls .venv/lib/python3*/site-packages/pyflink/opt/flink-python-*.jar 2>/dev/null | head -1)
[ -n "$flink_python_jar" ] || die "flink-python jar not found in .venv (is apache-flink installed?)"
key=$(stamp_of flink_jobs/beam-patches/*.java)-$(basename "$flink_python_jar" .jar)
patch_jar=$BUILD/flink-patches/flead-beam-patches.jar
if ! fresh flink-patches "$key" || [ ! -f "$patch_jar" ]; then
  command -v javac >/dev/null || die "javac (a JDK 17+) is required to build $patch_jar (apt-get install openjdk-17-jdk-headless)"
  say "Flink/Beam patches -> build/flink-patches"
  classes=$(mktemp -d)
  javac --release 11 -nowarn -cp "$flink_python_jar" -d "$classes" flink_jobs/beam-patches/*.java \
    || die "javac could not compile flink_jobs/beam-patches/*.java against $flink_python_jar"
  mkdir -p "$BUILD/flink-patches" && rm -f "$patch_jar"
  # of ServerFactory.java only the nested class: the real ServerFactory (and its UrlFactory) stay flink-python's
  find "$classes" -name 'ServerFactory*.class' ! -name 'ServerFactory$InetSocketAddressServerFactory.class' -delete
  (cd "$classes" && "$ROOT/.venv/bin/python" -m zipfile -c "$patch_jar" org)
  rm -rf "$classes"
  mark flink-patches "$key"
fi

# --- FerretDB (MongoDB wire protocol, SQLite backend), unless the user brings a MongoDB ------------------
if [ -z "${FLEAD_MONGO_URI:-}" ]; then
  command -v go >/dev/null || die "the Go toolchain is required to build the embedded MongoDB server (FerretDB), or set FLEAD_MONGO_URI"
  key=$(stamp_of storage/ferretdb/go.mod storage/ferretdb/go.sum)
  if ! fresh ferretdb "$key" || [ ! -x "$BUILD/bin/ferretdb" ]; then
    version=$(awk '/github.com\/FerretDB\/FerretDB v/ {print $2; exit}' storage/ferretdb/go.mod)
    say "FerretDB $version (go build)"
    src=$(cd /tmp && go mod download -json "github.com/FerretDB/FerretDB@$version" | awk -F'"' '/"Dir"/ {print $4}')
    [ -d "$src" ] || die "go could not download FerretDB $version (is the Go module proxy reachable?)"
    rm -rf "$BUILD/ferretdb-src" && cp -r "$src" "$BUILD/ferretdb-src" && chmod -R u+w "$BUILD/ferretdb-src"
    echo "$version" > "$BUILD/ferretdb-src/build/version/version.txt"
    (cd storage/ferretdb && go build -o "$BUILD/bin/ferretdb" github.com/FerretDB/FerretDB/cmd/ferretdb) \
      || die "go build of FerretDB failed"
    mark ferretdb "$key"
  fi
fi

# --- Flink's Prometheus reporter, bound to one address (monitoring/flink_reporter) -------------------------
# flink-metrics-prometheus (build/flink-libs, from flink_jobs/pom.xml) listens on all interfaces; this small factory
# serves the same reporter on metrics.flink_reporter_host. The stream job loads both jars through pipeline.jars.
reporter_src=monitoring/flink_reporter/src
key=$(stamp_of flink_jobs/pom.xml "$reporter_src"/io/flead/metrics/*.java "$reporter_src"/META-INF/services/*)
reporter_jar=$BUILD/flink-libs/flead-prometheus-reporter.jar
if ! fresh flink-reporter "$key" || [ ! -f "$reporter_jar" ]; then
  say "Flink Prometheus reporter factory (javac) -> build/flink-libs/flead-prometheus-reporter.jar"
  command -v javac >/dev/null || die "javac is required for the Flink metrics reporter (a JDK: apt-get install openjdk-17-jdk-headless)"
  flink_lib=$(.venv/bin/python -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))') \
    || die "the virtualenv has no pyflink (see the lines above)"
  prometheus_jar=$(ls "$BUILD"/flink-libs/flink-metrics-prometheus-*.jar 2>/dev/null | head -1)
  [ -f "$prometheus_jar" ] || die "flink-metrics-prometheus missing in build/flink-libs (flink_jobs/pom.xml)"
  classes=$(mktemp -d)
  javac --release 17 -nowarn -d "$classes" -cp "$prometheus_jar:$flink_lib/*" "$reporter_src"/io/flead/metrics/*.java \
    || die "javac of $reporter_src failed"
  cp -r "$reporter_src/META-INF" "$classes/" && jar cf "$reporter_jar" -C "$classes" . || die "jar of the reporter failed"
  rm -rf "$classes"
  mark flink-reporter "$key"
fi

# --- Alertmanager, built from the Go module proxy: the incident router's tests deliver to a real one ------------
ALERTMANAGER_VERSION=v0.35.0
key=$(echo "alertmanager $ALERTMANAGER_VERSION" | sha256sum | cut -c1-16)
if ! fresh alertmanager "$key" || [ ! -x "$BUILD/bin/alertmanager" ]; then
  command -v go >/dev/null || die "the Go toolchain is required to build Alertmanager (the incident routing tests use it)"
  say "Alertmanager $ALERTMANAGER_VERSION (go build; without its web UI: FLEAD uses its API)"
  src=$(cd /tmp && go mod download -json "github.com/prometheus/alertmanager@$ALERTMANAGER_VERSION" | awk -F'"' '/"Dir"/ {print $4}')
  [ -d "$src" ] || die "go could not download Alertmanager $ALERTMANAGER_VERSION (is the Go module proxy reachable?)"
  rm -rf "$BUILD/alertmanager-src" && cp -r "$src" "$BUILD/alertmanager-src" && chmod -R u+w "$BUILD/alertmanager-src"
  # ui/web.go embeds ui/app/dist, which the module leaves out (it is built by npm): a placeholder page lets it build
  mkdir -p "$BUILD/alertmanager-src/ui/app/dist"
  echo '<!doctype html><title>Alertmanager</title><p>Web UI not built; the API is at /api/v2.' \
    > "$BUILD/alertmanager-src/ui/app/dist/index.html"
  (cd "$BUILD/alertmanager-src" && go build -buildvcs=false \
     -ldflags "-X github.com/prometheus/common/version.Version=${ALERTMANAGER_VERSION#v}" \
     -o "$BUILD/bin/alertmanager" ./cmd/alertmanager) || die "go build of Alertmanager failed"
  mark alertmanager "$key"
fi

# --- Superset (own virtualenv) and the headless browser for dashboard checks -----------------------------
if [ "$WHAT" = all ] && [ -f visualization/setup_superset.sh ]; then
  bash visualization/setup_superset.sh
fi
say "ready"
