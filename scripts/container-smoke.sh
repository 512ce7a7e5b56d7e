#!/usr/bin/env bash
# Build the project's Dockerfile with podman on a machine that cannot reach any container registry, then run the
# CLI and the micro pipeline (`dvc repro`, all stages) inside the image.
#
#   scripts/container-smoke.sh            # as root on Debian/Ubuntu (it apt-installs what it lacks)
#
# What it does, and what it leaves:
# - apt-get installs podman, runc and debootstrap if any is missing (they stay installed). No configuration under
#   /etc is written; the few small state paths podman creates outside its --root (/etc/containers/networks,
#   /run/containers, /var/lib/containers) are removed again if they did not exist before.
# - Everything else lives in one scratch directory (REPRO_SMOKE_DIR, default a fresh /var/tmp/repro-container-smoke.*)
#   that is removed at the end, pass or fail: podman's storage (--root/--runroot there, not the system store), its
#   containers.conf (given by CONTAINERS_CONF: runc, and ulimits the sandbox allows), the base rootfs, the project.
# - The base image is made locally (debootstrap bookworm minbase, imported as localhost/repro-base) and passed as
#   BASE_IMAGE, since the pinned CUDA base cannot be pulled here; the Dockerfile is otherwise the one the cluster uses,
#   and so is the lock (CUDA torch: about 6 GB installed; it runs on CPU).
# - The build has the host network (apt and pip need it) and the host CA bundle, mounted at build time only
#   (--build-arg PIP_CERT); the runs have no network at all.
# - No daemon is started (podman is daemonless here); the containers run in the foreground with --rm.
# Exit status: 0 passed; 77 this machine cannot run containers (the reason is printed, found by trying); else failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
t0=$SECONDS
step() { printf '[container-smoke %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
cannot() { echo "CANNOT RUN CONTAINERS HERE: $*" >&2; exit 77; }

# --- tools -----------------------------------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || cannot "missing ${missing[*]} and not root, so cannot apt-get install them"
    command -v apt-get >/dev/null || cannot "missing ${missing[*]} and there is no apt-get"
    step "apt-get install podman runc debootstrap (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || cannot "apt-get update failed"
    apt-get install -y -q --no-install-recommends podman runc debootstrap >/dev/null \
        || cannot "apt-get install podman runc debootstrap failed"
fi
[ "$(id -u)" = 0 ] || cannot "podman here needs root (debootstrap and rootful storage); run as root"

# --- scratch directory, podman config, cleanup -------------------------------------------------------------------
work=${REPRO_SMOKE_DIR:-$(mktemp -d /var/tmp/repro-container-smoke.XXXXXX)}
mkdir -p "$work/tmp"
# Disk: the build, committed one layer at a time, peaked at 15.2 GB over what was in use before, and the whole run
# at 17.0 GB (measured on 2026-11-23 by sampling df every 2 s). Found by asking, not by filling the disk half-way.
need_gb=${REPRO_SMOKE_NEED_GB:-19}
free_gb=$(( $(df --output=avail -B1M "$work" | tail -1) / 1024 ))
if [ "$free_gb" -lt "$need_gb" ]; then
    rm -rf "$work"
    cannot "only ${free_gb} GB free under $(dirname "$work"); the image build and run need about ${need_gb} GB (REPRO_SMOKE_NEED_GB)"
fi
export TMPDIR="$work/tmp"                   # buildah's temporary files too, so that they go with $work
cat > "$work/containers.conf" <<'EOF'
# crun cannot raise RLIMIT_NOFILE (no CAP_SYS_RESOURCE) and cgroups are in hybrid mode on this kind of VM: use runc
# and ulimits the sandbox allows.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$work/containers.conf"
pm() { podman --root "$work/storage" --runroot "$work/run" --storage-driver overlay "$@"; }
podman_state=(/etc/containers/networks /run/containers /var/lib/containers)
new_state=()
for d in "${podman_state[@]}"; do [ -e "$d" ] || new_state+=("$d"); done
cleanup() {
    local rc=$?
    step "cleanup (exit $rc)"
    pm rm --all --force >/dev/null 2>&1 || true
    pm system reset --force >/dev/null 2>&1 || true
    # nothing may stay mounted below $work before it is removed
    { grep -o " $work/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$work" || true
    for d in "${new_state[@]}"; do rm -rf "$d" || true; done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- base image ----------------------------------------------------------------------------------------------------
mirror=${REPRO_SMOKE_MIRROR:-http://deb.debian.org/debian}
step "debootstrap bookworm minbase from $mirror"
debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; cannot "debootstrap bookworm failed (no Debian mirror reachable?)"; }
step "import the base image"
tar -C "$work/rootfs" -c . | pm import - localhost/repro-base:bookworm >/dev/null
rm -rf "$work/rootfs"
step "probe: run a container from the base image"
if ! probe=$(pm run --rm --network none localhost/repro-base:bookworm /bin/echo probe-ok 2>&1) \
        || [ "$probe" != probe-ok ]; then
    cannot "podman run of a local image failed: $probe"
fi

# --- build ----------------------------------------------------------------------------------------------------------
ca=${REPRO_SMOKE_CA:-/etc/ssl/certs/ca-certificates.crt}
build_args=(--build-arg BASE_IMAGE=localhost/repro-base:bookworm)
[ -f "$ca" ] && build_args+=(--volume "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
step "podman build (Dockerfile, requirements.lock, BASE_IMAGE=localhost/repro-base:bookworm)"
# --layers: one commit per step, so the peak disk use is set by the largest layer, not the whole image (Dockerfile)
pm build --pull=never --network host --layers "${build_args[@]}" \
    --build-arg REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t localhost/repro:smoke -f "$root/Dockerfile" "$root"
pm image ls localhost/repro:smoke

# --- runs -----------------------------------------------------------------------------------------------------------
run() { pm run --rm --network none "$@"; }
step "repro --help"
run localhost/repro:smoke --help | tee "$work/help.txt"
grep -q 'presets' "$work/help.txt"
step "repro presets"
run localhost/repro:smoke presets | tee "$work/presets.txt"
grep -qx micro "$work/presets.txt"
step "the image: non-root user, CUDA build of torch, consistent dependencies"
run --entrypoint /bin/sh localhost/repro:smoke -c 'test "$(id -u)" != 0 && echo "uid $(id -u)"'
run --entrypoint python localhost/repro:smoke -c \
    'import torch, torchvision, torch_fidelity; assert torch.version.cuda, "not a CUDA build"; print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())'
run --entrypoint pip localhost/repro:smoke check

step "micro pipeline: dvc repro inside the container"
proj="$work/project"
mkdir -p "$proj"
cp "$root/dvc.yaml" "$proj/"
cp -r "$root/repro" "$proj/repro"          # dvc.yaml lists the modules each stage runs as its deps
find "$proj/repro" -name __pycache__ -prune -exec rm -rf {} +
run localhost/repro:smoke params --preset micro > "$proj/params.yaml"
printf '/mlflow.db\n/mlruns/\n/runs/\n/samples\n' > "$proj/.gitignore"
chown -R 10001:10001 "$proj"                # the image's user
run --volume "$proj:/work" --entrypoint /bin/bash localhost/repro:smoke -c '
    set -e
    export HOME=/tmp GIT_AUTHOR_NAME=smoke GIT_AUTHOR_EMAIL=smoke@localhost GIT_COMMITTER_NAME=smoke GIT_COMMITTER_EMAIL=smoke@localhost
    git init -q && dvc init -q && git add -A && git commit -qm init
    dvc repro
    dvc status'
for f in data/manifest.json models/extractor.safetensors results/micro/metrics.json results/micro/table.md; do
    test -s "$proj/$f" || { echo "missing output $f" >&2; exit 1; }
done
cat "$proj/results/micro/table.md"
step "passed"
