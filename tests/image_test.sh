#!/usr/bin/env bash
# `make image-test`: build the image and run, inside it, the commands of docker/docker-compose.yml's
# services in order (train, index, api), as Compose would run them (the image's ENTRYPOINT, USER,
# WORKDIR and ENV; the services' volumes and environment), then check from outside the container:
#   /readyz 200 (and the cold start to it), a /search answer, a /score answer, the image's HEALTHCHECK
#   command passing, the server running as the image's non-root user, nothing written in any
#   container outside its mounted volumes, and every module the services imported having its bytecode
#   in the image (the cpu-serve target keeps only that bytecode): each service runs with an audit hook
#   (a sitecustomize on PYTHONPATH, in a /dpr-trace volume) that lists the .pyc files Python looks for.
# COMPOSE_FILE=docker-compose.milvus.yml (with TARGET=cpu, the image that file builds) runs that file's
# services built from the image instead: train, index, export, api (one replica). Its Milvus standalone
# (etcd, MinIO, milvus: other images) is stood in for by Milvus Lite, the embedded Milvus of the
# `milvus` extra: every `--milvus-uri http://milvus:19530` becomes a Milvus Lite file,
# /milvus/milvus.db, on a volume that export and api mount read-write (owned by the image's user, as a
# directory an operator prepared would be). The load balancer (nginx) is not run.
# No Docker engine needed: buildah (Debian: apt-get install buildah) with chroot isolation and vfs
# storage, as root; each service runs in its own working container, the api in its own network
# namespace (unshare), so port 8000 here is left alone.
# It tests the commit: the image is built from `git archive HEAD` (SOURCE=worktree: from this working
# tree, uncommitted changes included), and the compose file and demo data are that commit's.
# Settings (environment): TARGET (cpu-serve), IMAGE (dpr-service:$TARGET), COMPOSE_FILE
# (docker-compose.yml), SKIP_BUILD=1 (test an image already built), STORAGE_DRIVER (vfs), DPR_DATA (a BEIR directory for train and index; default: the
# demo data with its first 32 train and 16 dev questions, which keeps training to a few steps),
# RESULT (where the summary goes: runs/image-test/result.txt) and the build settings of
# docker/image.sh (PYTHON_IMAGE, TORCH_WHEELS, TORCH_INDEX_URL, PIP_INDEX_URL, EXTRA_CA_CERTS).
# Exit status: 0 when every check passed, 1 when one failed, 2 when it could not run.
# The whole script is one { ... } block: bash reads it all before running any of it, so editing
# (or checking out) this file while a run goes on cannot change that run.
{
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SOURCE=${SOURCE:-head}
TARGET=${TARGET:-cpu-serve}
IMAGE=${IMAGE:-dpr-service:$TARGET}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
export TARGET IMAGE STORAGE_DRIVER
B=(buildah --storage-driver "$STORAGE_DRIVER")
PY=${PYTHON:-$ROOT/.venv/bin/python}  # any python with PyYAML: it reads the compose file
RESULT=${RESULT:-$ROOT/runs/image-test/result.txt}

command -v buildah >/dev/null || { echo "image_test.sh: needs buildah (apt-get install buildah)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "image_test.sh: run as root (buildah's chroot isolation and unshare)" >&2; exit 2; }

WORK=$(mktemp -d /var/tmp/dpr-image-test.XXXXXX)
CONTAINERS=()
SERVER=
cleanup() {
  [ -z "$SERVER" ] || kill "$SERVER" 2>/dev/null || true
  for c in "${CONTAINERS[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ "$SOURCE" = head ]; then
  SRC=$WORK/src; mkdir -p "$SRC"; git archive HEAD | tar -x -C "$SRC"
  what="commit $(git rev-parse --short HEAD)"
else
  SRC=$ROOT
  what="the working tree at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with uncommitted changes')"
fi
COMPOSE=$SRC/docker/${COMPOSE_FILE:-docker-compose.yml}
[ -f "$COMPOSE" ] || { echo "image_test.sh: no compose file $COMPOSE" >&2; exit 2; }
MILVUS_LITE=/milvus/milvus.db  # the Milvus Lite file that stands in for http://milvus:19530
export MILVUS_LITE

mkdir -p "$(dirname "$RESULT")"
: > "$RESULT"
FAILED=0
say() { echo "$*" | tee -a "$RESULT"; }
check() {  # check NAME COMMAND...: one PASS/FAIL line
  local name=$1; shift
  if "$@"; then say "PASS  $name"; else say "FAIL  $name"; FAILED=1; fi
}

if [ "${SKIP_BUILD:-0}" = 1 ]; then what="an image built before (SKIP_BUILD=1); compose file and data of $what"; else what="built from $what"; fi
say "image test: $IMAGE (target $TARGET), $what, $(date -u +%FT%TZ), $(nproc) CPUs, services of docker/$(basename "$COMPOSE")"

# ------------------------------------------------------------------ build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  "$SRC/docker/image.sh"
  say "build: $(( $(date +%s) - t0 )) s (LAYERS=${LAYERS:-0}: 1 reuses cached layers)"
fi
say "image size: $("${B[@]}" images --format '{{.Size}}' --filter "reference=$IMAGE" | head -n 1) (buildah images: its layers, uncompressed)"

# ------------------------------------------------------------------ the image's configuration
"${B[@]}" inspect --type image "$IMAGE" > "$WORK/image.json"
cfg() { "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))["Docker"]["config"]; print(json.dumps(c.get(sys.argv[2])))' "$WORK/image.json" "$1"; }
USER_=$(cfg User | "$PY" -c 'import json, sys; print(json.load(sys.stdin) or "")')
mapfile -t ENTRYPOINT < <(cfg Entrypoint | "$PY" -c 'import json, sys; print("\n".join(json.load(sys.stdin) or []))')
mapfile -t HEALTH < <(cfg Healthcheck | "$PY" -c '
import json, sys
test = (json.load(sys.stdin) or {}).get("Test") or ["NONE"]
print("\n".join(test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else []))')
check "the image names a non-root user ($USER_)" test -n "$USER_" -a "$USER_" != 0 -a "$USER_" != root
check "the image has a HEALTHCHECK command (${HEALTH[*]:0:2} ...)" test "${#HEALTH[@]}" -gt 0

# ------------------------------------------------------------------ the data and the volumes
if [ -z "${DPR_DATA:-}" ]; then
  DPR_DATA=$WORK/data
  mkdir -p "$DPR_DATA/qrels"
  cp "$SRC"/dpr_service/demo_data/corpus.jsonl "$SRC"/dpr_service/demo_data/queries.jsonl "$DPR_DATA/"
  head -n 33 "$SRC"/dpr_service/demo_data/qrels/train.tsv > "$DPR_DATA/qrels/train.tsv"  # header + 32
  head -n 17 "$SRC"/dpr_service/demo_data/qrels/dev.tsv > "$DPR_DATA/qrels/dev.tsv"      # header + 16
fi
export DPR_DATA
chmod -R a+rX "$DPR_DATA"
# Compose's named volumes start as a copy of the image's directory there (owner included: /artifacts
# belongs to the image's user), or empty and root's when the image has none (/jobdata); the Milvus
# Lite stand-in's volume is the image user's
mkdir -p "$WORK/volumes/milvus-lite"
chown "$USER_" "$WORK/volumes/milvus-lite"
# the audit hook every service runs with: the .pyc files Python looks for (it looks whether one is there
# or not: a missing one means the module is compiled from source at every start), one file a process
mkdir -p "$WORK/trace"
chmod 1777 "$WORK/trace"
cat > "$WORK/trace/sitecustomize.py" <<'EOF'
import os
import sys

_log = open(f"/dpr-trace/pyc-{os.getpid()}.txt", "a", buffering=1)


def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].endswith(".pyc"):
        _log.write(args[0] + "\n")


sys.addaudithook(_hook)
EOF

# service_args SERVICE KIND: the service's command, -v and --env arguments, one a line, from the
# compose file with its ${VAR:-default}s filled in from this environment
service_args() {
  "$PY" - "$COMPOSE" "$1" "$2" "$WORK/volumes" <<'EOF'
import os, re, sys
import yaml
compose, service, kind, volumes = sys.argv[1:]
spec = yaml.safe_load(open(compose))
svc = spec["services"][service]
expand = lambda v: re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), str(v))
# the Milvus standalone of docker-compose.milvus.yml, stood in for by a Milvus Lite file on its own volume
lite = os.environ["MILVUS_LITE"]
milvus = "--milvus-uri" in svc.get("command", [])
standin = lambda a: lite if milvus and a == "http://milvus:19530" else a
if kind == "command":
    print("\n".join(standin(expand(a)) for a in svc["command"]))
elif kind == "volumes":
    if milvus:
        print(f"{os.path.join(volumes, 'milvus-lite')}:{os.path.dirname(lite)}:rw")
    for v in svc.get("volumes", []):
        parts = expand(v).split(":")
        src, dst, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "rw")
        if src in spec.get("volumes", {}):
            src = os.path.join(volumes, src)
        else:
            src = os.path.normpath(os.path.join(os.path.dirname(compose), src))
        print(f"{src}:{dst}:{mode}")
elif kind == "tmpfs":
    for t in svc.get("tmpfs", []):
        print(f"type=tmpfs,destination={t}")
elif kind == "environment":
    for k, v in (svc.get("environment") or {}).items():
        print(f"{k}={expand(v)}")
EOF
}

# run_service SERVICE [background]: a fresh container of the image runs the service's command
declare -A MNT MARK CTR
start_service() {
  local svc=$1 ctr v vols=() envs=() spec
  ctr=$("${B[@]}" from --pull=never --name "dpr-image-test-$svc-$$" "$IMAGE")
  CONTAINERS+=("$ctr"); CTR[$svc]=$ctr
  MNT[$svc]=$("${B[@]}" mount "$ctr")
  while IFS= read -r spec; do
    local src=${spec%%:*}
    if [ ! -e "$src" ]; then  # a named volume: Compose's first-use copy of the image's directory
      local dst=${spec#*:}; dst=${dst%%:*}
      mkdir -p "$src"
      if [ -d "${MNT[$svc]}$dst" ]; then chown "$(stat -c %u:%g "${MNT[$svc]}$dst")" "$src"; fi
    fi
    vols+=(-v "$spec")
  done < <(service_args "$svc" volumes)
  while IFS= read -r v; do envs+=(--env "$v"); done < <(service_args "$svc" environment)
  while IFS= read -r v; do vols+=(--mount "$v"); done < <(service_args "$svc" tmpfs)
  vols+=(-v "$WORK/trace:/dpr-trace:rw"); envs+=(--env PYTHONPATH=/dpr-trace)
  mapfile -t CMD < <(service_args "$svc" command)
  MARK[$svc]=$WORK/mark-$svc
  touch "${MARK[$svc]}"; sleep 1
  RUN=("${B[@]}" run --isolation chroot "${vols[@]}" "${envs[@]}" "$ctr" -- "${ENTRYPOINT[@]}" "${CMD[@]}")
}

# nothing written in the container outside its volumes: files changed since the service started,
# less what the runtime itself writes (/etc/hosts, resolv.conf, hostname, /run/.containerenv,
# the mount points it makes for the volumes and /dev, /proc, /sys, and their parent directories)
check_writes() {
  local svc=$1 mnt=${MNT[$1]} dst
  local allowed=(/etc /etc/hosts /etc/resolv.conf /etc/hostname /run /run/.containerenv / /dev /proc /sys /dpr-trace)
  while IFS= read -r spec; do dst=${spec#*:}; allowed+=("${dst%%:*}"); done < <(service_args "$svc" volumes)
  while IFS= read -r spec; do dst=${spec#*destination=}; allowed+=("$dst"); done < <(service_args "$svc" tmpfs)
  "$PY" - "$mnt" "${MARK[$svc]}" "${allowed[@]}" > "$WORK/writes-$svc" <<'EOF'
import os, sys
root, mark, allowed = sys.argv[1], os.stat(sys.argv[2]).st_mtime, set(sys.argv[3:])
for d, dirs, files in os.walk(root):
    rel = "/" + os.path.relpath(d, root).lstrip(".")
    if rel in ("/proc", "/sys", "/dev") or rel.startswith(("/proc/", "/sys/", "/dev/")):
        dirs[:] = []
        continue
    for name in [""] + files:
        p = os.path.join(d, name) if name else d
        st = os.lstat(p)
        relp = os.path.normpath("/" + os.path.relpath(p, root))
        if max(st.st_mtime, st.st_ctime) >= mark and relp not in allowed:
            print(relp)
EOF
  if [ -s "$WORK/writes-$svc" ]; then
    say "      $svc wrote outside its volumes: $(head -n 20 "$WORK/writes-$svc" | tr '\n' ' ')"
    return 1
  fi
}

# ------------------------------------------------------------------ train, index (one-shot, in order)
ONESHOT=(train index)
"$PY" -c 'import sys, yaml; sys.exit(0 if "export" in yaml.safe_load(open(sys.argv[1]))["services"] else 1)' "$COMPOSE" && ONESHOT+=(export)
for svc in "${ONESHOT[@]}"; do
  start_service "$svc"
  t0=$(date +%s)
  if "${RUN[@]}" > "$WORK/$svc.log" 2>&1; then
    say "PASS  $svc: \`${CMD[*]}\` exited 0 in $(( $(date +%s) - t0 )) s"
  else
    say "FAIL  $svc: \`${CMD[*]}\` exited non-zero; its last lines:"; tail -n 20 "$WORK/$svc.log" | tee -a "$RESULT"
    exit 1
  fi
  check "$svc wrote nothing outside its volumes" check_writes "$svc"
done
check "train left best/ and index left manifest.json in the artifacts volume" \
  test -d "$WORK/volumes/artifacts/train/best" -a -f "$WORK/volumes/artifacts/index/manifest.json"

# ------------------------------------------------------------------ api (long-running, own network namespace)
start_service api
t0=$(date +%s.%N)
unshare --net bash -c 'ip link set lo up && exec "$@"' _ "${RUN[@]}" > "$WORK/api.log" 2>&1 &
SERVER=$!
NET=(nsenter --net=/proc/$SERVER/ns/net)
ready=0
for _ in $(seq 1 1200); do  # up to 240 s (the HEALTHCHECK's start period is 120 s)
  if ! kill -0 "$SERVER" 2>/dev/null; then break; fi
  code=$("${NET[@]}" curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/readyz || true)
  if [ "$code" = 200 ]; then ready=1; break; fi
  sleep 0.2
done
if [ "$ready" = 1 ]; then
  say "PASS  api: /readyz 200, cold start $("$PY" -c 'import sys, time; print(f"{time.time() - float(sys.argv[1]):.1f}")' "$t0") s (container start to first 200)"
else
  say "FAIL  api: /readyz never answered 200; the server's last lines:"; tail -n 20 "$WORK/api.log" | tee -a "$RESULT"
  exit 1
fi
search=$("${NET[@]}" curl -s http://127.0.0.1:8000/search -H 'content-type: application/json' \
  -d '{"query": "which lighthouse has a red flash?", "top_k": 3}')
check "api: /search answers 3 results ($(echo "$search" | head -c 160))" \
  "$PY" -c 'import json, sys; r = json.loads(sys.argv[1]); assert len(r["results"][0]) == 3' "$search"
score=$("${NET[@]}" curl -s http://127.0.0.1:8000/score -H 'content-type: application/json' \
  -d '{"items": [{"question": "which lighthouse has a red flash?", "positive": "The Ember Light flashes red.", "negatives": ["The Saltwatch tower is painted red and shows a green light."]}]}')
check "api: /score answers a finite loss ($(echo "$score" | head -c 160))" \
  "$PY" -c 'import json, math, sys; r = json.loads(sys.argv[1]); assert math.isfinite(r["mean_loss"]) and len(r["results"][0]["probabilities"]) == 2' "$score"
check "the image's HEALTHCHECK command passes in the api container" \
  "${NET[@]}" "${B[@]}" run --isolation chroot "${CTR[api]}" -- "${HEALTH[@]}"
# the server process: the container's process (a descendant of the unshare) running `serve`
server_procs() {  # "pid uid" lines
  ps -eo pid=,ppid=,uid=,args= | "$PY" -c '
import sys
root, procs = sys.argv[1], [l.split(None, 3) for l in sys.stdin]
tree = {root}
for _ in range(10):
    tree |= {p[0] for p in procs if p[1] in tree}
for p in procs:
    if p[0] in tree and len(p) > 3 and " serve " in p[3] and "buildah" not in p[3] and "unshare" not in p[3]:
        print(p[0], p[2])' "$SERVER"
}
uids=$(server_procs | awk '{print $2}' | sort -u | tr '\n' ' ' | sed 's/ $//')
check "api: the server runs as uid '$uids', the image's user $USER_" test -n "$uids" -a "$uids" = "$(id -u "$USER_" 2>/dev/null || echo "$USER_")"
# stop it as `docker compose stop` would: SIGTERM to the container's main process
for pid in $(server_procs | awk '{print $1}'); do kill -TERM "$pid" 2>/dev/null || true; done
for _ in $(seq 1 60); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.5; done
kill "$SERVER" 2>/dev/null || true
wait "$SERVER" 2>/dev/null || true
SERVER=
check "api wrote nothing outside its volumes" check_writes api

# ------------------------------------------------------------------ bytecode
check_bytecode() {
  while IFS= read -r p; do [ -e "${MNT[api]}$p" ] || echo "$p"; done < "$WORK/pyc-looked-for" > "$WORK/pyc-missing"
  if [ -s "$WORK/pyc-missing" ]; then
    say "      no bytecode in the image for: $(head -n 20 "$WORK/pyc-missing" | tr '\n' ' ')"
    return 1
  fi
}
cat "$WORK"/trace/pyc-*.txt | grep -v '^/dpr-trace/' | sort -u > "$WORK/pyc-looked-for"
check "every module the services imported has its bytecode in the image ($(wc -l < "$WORK/pyc-looked-for") .pyc files)" check_bytecode

say "result: $([ "$FAILED" = 0 ] && echo 'all checks passed' || echo 'FAILED')"
exit "$FAILED"
}
