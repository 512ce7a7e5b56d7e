# Shared by the sbatch scripts in slurm/ (sourced, not run). Parses the arguments, picks the container, and
# defines `run_repro`, which starts `repro` on every task of the job (one per GPU) through srun.
#
# Arguments (or the environment variables in brackets):
#   --preset NAME [PRESET]   a named preset (outputs under the submit directory), or
#   --params FILE [PARAMS]   a params file (default: params.yaml in the submit directory)
#   --round R     [ROUND]    ddo_round.sh only
#   --set K=V                any config override (repeatable) [REPRO_SET: space-separated K=V]
# Container [REPRO_CONTAINER = none | apptainer | pyxis], image [REPRO_IMAGE], mounts [REPRO_BIND, comma-separated].
set -euo pipefail

PRESET=${PRESET:-}
PARAMS=${PARAMS:-}
ROUND=${ROUND:-}
SETS=()
for kv in ${REPRO_SET:-}; do SETS+=(--set "$kv"); done
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) PRESET=$2; shift 2 ;;
        --params) PARAMS=$2; shift 2 ;;
        --round) ROUND=$2; shift 2 ;;
        --set) SETS+=(--set "$2"); shift 2 ;;
        *) echo "error: unknown argument '$1' (use --preset NAME | --params FILE, --round R, --set KEY=VALUE)" >&2
           exit 2 ;;
    esac
done
CONFIG=()
if [ -n "$PRESET" ]; then CONFIG=(--preset "$PRESET"); elif [ -n "$PARAMS" ]; then CONFIG=(--params "$PARAMS"); fi

# Jobs never submit jobs: inside one, every stage runs where it is (repro/cluster/launcher.py).
export REPRO_IN_JOB=1 OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1

WRAP=()
SRUN_ARGS=(--kill-on-bad-exit=1)
case "${REPRO_CONTAINER:-none}" in
    none) ;;
    apptainer)
        [ -n "${REPRO_IMAGE:-}" ] || { echo "error: REPRO_CONTAINER=apptainer needs REPRO_IMAGE=/path/to/repro.sif" >&2; exit 2; }
        WRAP=(apptainer exec --nv)
        IFS=, read -r -a binds <<< "${REPRO_BIND:-}"
        for b in "${binds[@]}"; do WRAP+=(--bind "$b"); done
        WRAP+=("$REPRO_IMAGE") ;;
    pyxis)
        [ -n "${REPRO_IMAGE:-}" ] || { echo "error: REPRO_CONTAINER=pyxis needs REPRO_IMAGE=<image or .sqsh>" >&2; exit 2; }
        SRUN_ARGS+=(--container-image="$REPRO_IMAGE" --container-workdir="$PWD")
        [ -z "${REPRO_BIND:-}" ] || SRUN_ARGS+=(--container-mounts="$REPRO_BIND") ;;
    *) echo "error: REPRO_CONTAINER='$REPRO_CONTAINER': use none, apptainer or pyxis" >&2; exit 2 ;;
esac

echo "[slurm] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $(date -u +%FT%TZ)" >&2

run_repro() {  # run_repro STAGE [ARGS...]: the stage on every task of the job
    echo "[slurm] repro $* ${CONFIG[*]} ${SETS[*]}" >&2
    srun "${SRUN_ARGS[@]}" "${WRAP[@]}" repro "$@" "${CONFIG[@]}" "${SETS[@]}"
}
