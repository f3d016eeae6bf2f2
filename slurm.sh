#!/usr/bin/env bash
# train.py on a Slurm cluster: one torchrun per node, which starts one rank per GPU; the nodes meet at the first node
# of the job (c10d rendezvous). The job resumes by itself from out_dir's newest checkpoint, so a requeued or
# resubmitted job continues exactly where the last one stopped.
#
#   sbatch slurm.sh                                        # SmolLM2-1.7B, 8 nodes x 8 GPUs (the #SBATCH lines below)
#   sbatch --nodes=2 slurm.sh configs/smol360m.py --micro_batch_size=8     # any config, then train.py's overrides
#   OUT_DIR=/scratch/runs/1.7b sbatch slurm.sh             # checkpoints on shared storage that every node sees
#
# Preemption and the time limit: Slurm sends SIGTERM (here also 5 minutes before the limit), srun and torchrun pass it
# to every rank, and train.py saves a checkpoint and exits 0. `--requeue` puts a preempted job back in the queue.
#SBATCH --job-name=nanosmol
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

CONFIG=${1:-configs/smol1.7b.py}
[[ $# -gt 0 ]] && shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
OUT_DIR=${OUT_DIR:-out/$(basename "$CONFIG" .py)}
PORT=${MASTER_PORT:-29500}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# each rank's CPU threads: the node's cores shared out, not one pool per rank that oversubscribes them
THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a rank that dies takes the job down instead of hanging the collectives
export PYTHONUNBUFFERED=1                  # log lines reach slurm-*.out as they are written

RESUME=()
if compgen -G "$OUT_DIR/ckpt_*" > /dev/null; then
    RESUME=(--init_from=resume)
    echo "resuming from $OUT_DIR"
fi

echo "$SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE GPUs, rendezvous at $HEAD_NODE:$PORT, config $CONFIG"
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$PORT" \
    train.py "$CONFIG" --out_dir="$OUT_DIR" "${RESUME[@]}" "$@"
