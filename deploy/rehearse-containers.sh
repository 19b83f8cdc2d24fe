#!/usr/bin/env bash
# Rehearse deploy/compose.yaml with a container engine (docker or podman, no compose tool):
# build the coordinator and site images, create compose.yaml's private network and volumes,
# run its services in order (certs and generate once, the coordinator until its front
# answers, the three sites), wait for the coordinator to end, check its output (checkpoint,
# one row per site and round, every site trained in every round, finished:completed) and
# stop and remove every container, network and volume this script made (trap on exit).
# The run arguments come from deploy/compose2run.py, so the containers are compose.yaml's.
#
#   deploy/rehearse-containers.sh                       # docker, official python base image
#
# Environment (all optional):
#   CONTAINER_ENGINE   docker | podman (default: docker if present, else podman)
#   CONTAINER_FLAGS    global flags for every engine call, e.g. on the project's machines
#                      "--runtime runc --cgroup-manager=cgroupfs"
#   BUILD_FLAGS        extra flags for `build`, e.g. "--network host
#                      -v /etc/ssl/certs:/etc/ssl/certs:ro" (podman's -v: a CA bundle)
#   BASE_IMAGE         base of both images (default: the Dockerfiles' official python image)
#   PIP_FIND_LINKS     folder (or URL) of wheels, e.g. the CPU torch wheel; a local folder
#                      is mounted into podman's build (docker: use TORCH_INDEX or a URL)
#   TORCH_INDEX        a CPU wheel index, e.g. https://download.pytorch.org/whl/cpu
#   SKIP_BUILD=1       use the images as they are
#   REHEARSAL_PROJECT  name prefix of what is created (default m2diff-rehearsal-PID)
#   REHEARSAL_TIMEOUT  seconds the coordinator may take (default 1800)
#   REHEARSAL_COMPOSE  another compose file in deploy/ (default deploy/compose.yaml)
#   REHEARSAL_OUT      folder for the containers' logs and the coordinator's output
#                      (default: a new folder under ${TMPDIR:-/tmp}); kept afterwards
#   PYTHON             a python3 with PyYAML for compose2run.py (default: .venv/bin/python
#                      of the repository if there, else python3)
#   NICE               niceness of the builds (default 10)
# Exit status 0: the rehearsal ran and its output checked out.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$REPO/deploy
COMPOSE=${REHEARSAL_COMPOSE:-$DEPLOY/compose.yaml}
ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
command -v "$ENGINE" >/dev/null 2>&1 || { echo "rehearse: no container engine '$ENGINE'" >&2; exit 2; }
read -r -a FLAGS <<< "${CONTAINER_FLAGS:-}"
read -r -a BFLAGS <<< "${BUILD_FLAGS:-}"
# compose's healthcheck is polled by this script (ENGINE exec); podman runs an image's
# HEALTHCHECK through systemd, which a container host may not have
RUNFLAGS=()
if [ "$ENGINE" = podman ]; then RUNFLAGS+=(--no-healthcheck); fi
PROJECT=${REHEARSAL_PROJECT:-m2diff-rehearsal-$$}
TIMEOUT=${REHEARSAL_TIMEOUT:-1800}
OUT=${REHEARSAL_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/m2diff-rehearsal.XXXXXX")}
mkdir -p "$OUT/logs"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import yaml" 2>/dev/null \
  || { echo "rehearse: $PYTHON has no PyYAML (pip install pyyaml, or PYTHON=...)" >&2; exit 2; }

e() { "$ENGINE" "${FLAGS[@]}" "$@"; }
c2r() { "$PYTHON" "$DEPLOY/compose2run.py" -f "$COMPOSE" -p "$PROJECT" "$@"; }
say() { printf '[rehearse %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
T0=$(date +%s)
since() { echo $(( $(date +%s) - ${1:-$T0} )); }

# -- cleanup: only what this script created, by name ---------------------------------------
CONTAINERS=() VOLUMES=() NETWORKS=() hashes=()
cleanup() {
  local rc=$? name
  trap - EXIT INT TERM
  for name in "${CONTAINERS[@]}"; do
    e logs "$name" > "$OUT/logs/$name.log" 2>&1 || true
    e stop -t 5 "$name" >/dev/null 2>&1 || true
    e rm -f "$name" >/dev/null 2>&1 || echo "rehearse: could not remove container $name" >&2
  done
  for name in "${NETWORKS[@]}"; do
    e network rm "$name" >/dev/null 2>&1 || echo "rehearse: could not remove network $name" >&2
  done
  for name in "${VOLUMES[@]}"; do
    e volume rm -f "$name" >/dev/null 2>&1 || echo "rehearse: could not remove volume $name" >&2
  done
  say "removed ${#CONTAINERS[@]} container(s), ${#NETWORKS[@]} network(s), ${#VOLUMES[@]} volume(s); logs and output in $OUT"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- build -------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  args=(build "${BFLAGS[@]}")
  [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [ -n "${TORCH_INDEX:-}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
  if [ -n "${PIP_FIND_LINKS:-}" ]; then
    args+=(--build-arg "PIP_FIND_LINKS=$PIP_FIND_LINKS")
    if [ "$ENGINE" = podman ] && [ -d "$PIP_FIND_LINKS" ]; then
      args+=(-v "$PIP_FIND_LINKS:$PIP_FIND_LINKS:ro")
    fi
  fi
  # podman's default OCI image format drops HEALTHCHECK; docker's format keeps it
  [ "$ENGINE" = podman ] && args+=(--format docker)
  while read -r image dockerfile; do
    t=$(date +%s)
    say "building $image from $dockerfile ($ENGINE${BASE_IMAGE:+, base $BASE_IMAGE})"
    nice -n "${NICE:-10}" "$ENGINE" "${FLAGS[@]}" "${args[@]}" -f "$REPO/$dockerfile" -t "$image" "$REPO" \
      > "$OUT/logs/build-${image//[:\/]/-}.log" 2>&1 \
      || { tail -30 "$OUT/logs/build-${image//[:\/]/-}.log" >&2; say "build of $image failed"; exit 1; }
    size=$(e image inspect --format '{{.Size}}' "$image")
    say "built $image in $(since "$t") s: $(( size / 1000000 )) MB"
  done < <(c2r builds)
fi
T1=$(date +%s)

# -- the sites' app pin: the hash each site image wrote at build time must be the hash of the
# app folder that the coordinator image submits (the same files), or every site refuses it
while read -r image dockerfile; do
  case $dockerfile in
    *coordinator*) pin=$(e run --rm "${RUNFLAGS[@]}" --network none --entrypoint m2diff-client "$image" fab-hash /opt/m2diff) ;;
    *) hashes+=("$image $(e run --rm "${RUNFLAGS[@]}" --network none --entrypoint cat "$image" /opt/m2diff-app.sha256)") ;;
  esac
done < <(c2r builds)
for h in "${hashes[@]}"; do
  [ "${h#* }" = "$pin" ] || { say "app pin of ${h%% *} (${h#* }) is not the coordinator's app ($pin)"; exit 1; }
done
say "app (FAB) pin of the site image(s) = the coordinator's app: $pin"

# -- network, volumes, services in compose.yaml's order ----------------------------------------
while read -r net kind; do
  if [ "$kind" = internal ]; then e network create --internal "$net" >/dev/null
  else e network create "$net" >/dev/null; fi
  NETWORKS+=("$net")
done < <(c2r networks)
while read -r vol; do
  e volume create "$vol" >/dev/null
  VOLUMES+=("$vol")
done < <(c2r volumes)

running() { [ "$(e inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" = true ]; }
exit_code() { e inspect --format '{{.State.ExitCode}}' "$1"; }

COORD=""
while read -r svc kind; do
  mapfile -d '' -t run < <(c2r run "$svc")
  name=$PROJECT-$svc-1
  CONTAINERS+=("$name")
  case $kind in
    once)
      t=$(date +%s)
      e run "${RUNFLAGS[@]}" "${run[@]}" > "$OUT/logs/$name.out" 2>&1 \
        || { cat "$OUT/logs/$name.out" >&2; say "$svc failed"; exit 1; }
      say "$svc done in $(since "$t") s: $(tail -1 "$OUT/logs/$name.out")"
      ;;
    healthy)
      e run -d "${RUNFLAGS[@]}" "${run[@]}" >/dev/null
      mapfile -d '' -t check < <(c2r health "$svc")
      t=$(date +%s)
      until e exec "$name" "${check[@]}" >/dev/null 2>&1; do
        running "$name" || { e logs "$name" 2>&1 | tail -30 >&2; say "$svc exited"; exit 1; }
        [ "$(since "$t")" -lt 600 ] || { say "$svc not healthy after 600 s"; exit 1; }
        sleep 3
      done
      say "$svc healthy after $(since "$t") s"
      ;;
    *)
      e run -d "${RUNFLAGS[@]}" "${run[@]}" >/dev/null
      say "$svc started"
      ;;
  esac
  [ "$svc" = coordinator ] && COORD=$name
done < <(c2r services)
[ -n "$COORD" ] || { say "compose.yaml has no coordinator service"; exit 1; }

# -- wait for the coordinator: it exits when the run ends (0 = finished:completed) ----------
t=$(date +%s)
seen=""
while running "$COORD"; do
  line=$(e logs "$COORD" 2>&1 | grep -E "round [0-9]+/[0-9]+ done" | tail -1 || true)
  [ -n "$line" ] && [ "$line" != "$seen" ] && { say "coordinator: ${line##*] }"; seen=$line; }
  [ "$(since "$t")" -lt "$TIMEOUT" ] || { say "coordinator still running after $TIMEOUT s"; exit 1; }
  sleep 5
done
rc=$(exit_code "$COORD")
say "coordinator exited with $rc after $(since "$t") s of federation"
e logs "$COORD" > "$OUT/logs/$COORD.log" 2>&1 || true
grep -E "^m2diff-server: .*(app \(FAB\) sha256|round [0-9]+/[0-9]+ done|rejected|finished|no site)" \
  "$OUT/logs/$COORD.log" \
  | sed 's/^/  /' | tail -20 || true

# -- check the output in the runs volume (with the coordinator image: torch reads the checkpoint)
runs=$(c2r volumes | grep '_runs$')
mapfile -d '' -t coord_run < <(c2r run coordinator)
out_dir=$(printf '%s\n' "${coord_run[@]}" | sed -n 's/^out=//p')
rounds=$(printf '%s\n' "${coord_run[@]}" | sed -n 's/^fl.rounds=//p')
sites=$(for svc in $(c2r services | awk '{print $1}'); do
          c2r run "$svc" | tr '\0' '\n' | sed -n 's/^site=//p'; done | sort | tr '\n' ' ')
image=$(c2r builds | awk '$2 ~ /coordinator/ {print $1}')
name=$PROJECT-check
CONTAINERS+=("$name")
set +e
e run -i "${RUNFLAGS[@]}" --name "$name" --network none -v "$runs:/runs:ro" --entrypoint python "$image" - \
  "$out_dir" "$rounds" "$sites" "$rc" > "$OUT/check.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
import torch
out, rounds, sites, rc = Path(sys.argv[1]), int(sys.argv[2]), set(sys.argv[3].split()), int(sys.argv[4])
problems = []
state = json.loads((out / "server.json").read_text())
rows = json.loads((out / "rounds.json").read_text())
ckpt = torch.load(out / "checkpoint.pt", weights_only=True, map_location="cpu")
if rc != 0 or state.get("status") != "finished:completed":
    problems.append(f"coordinator exit {rc}, run status {state.get('status')}")
if ckpt["extra"].get("round") != rounds:
    problems.append(f"checkpoint is of round {ckpt['extra'].get('round')}, not {rounds}")
if not all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()):
    problems.append("checkpoint has non-finite weights")
for rnd in range(1, rounds + 1):
    these = [r for r in rows if int(r["round"]) == rnd]
    trained = {r["site"] for r in these if "train_loss" in r and not r.get("rejected")}
    rejected = {r["site"]: r["rejected"] for r in these if r.get("rejected")}
    print(f"round {rnd}: {len(these)} row(s), trained: {', '.join(sorted(trained)) or 'none'}"
          + (f", rejected: {rejected}" if rejected else ""))
    if trained != sites:
        problems.append(f"round {rnd}: trained {sorted(trained)}, expected {sorted(sites)}")
    if not all(r.get("global_updated") == 1 for r in these):
        problems.append(f"round {rnd}: the global model was not updated")
print(f"checkpoint: round {ckpt['extra'].get('round')}, {len(ckpt['model'])} tensors; "
      f"app sha256 {state.get('app_sha256')}; status {state.get('status')}")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
ok=$?
set -e
sed 's/^/  /' "$OUT/check.txt"
e run --rm "${RUNFLAGS[@]}" --network none -v "$runs:/runs:ro" --entrypoint tar "$image" -C /runs -cf - . \
  | tar -C "$OUT" -xf - 2>/dev/null || true
if [ "$ok" = 0 ]; then
  say "PASS: $(echo "$sites" | wc -w) sites, $rounds rounds; built in $(( T1 - T0 )) s, rehearsal $(since "$T1") s"
else
  say "FAIL: see $OUT/check.txt and $OUT/logs"
fi
exit "$ok"
