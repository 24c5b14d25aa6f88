#!/bin/bash
# ddep on SLURM, on one node or several, through time limits and preemption.
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=24:00:00 examples/slurm.sh \
#       pretrain --config configs/pretrain/ddep_transunet_in21k_224.yaml data.root=/data/in21k-shards
#
# The arguments after the script are ddep's. Five minutes before the time limit SLURM sends
# SIGUSR1 to this script alone (B:), which passes it to srun; srun passes it to every node's
# torchrun, and torchrun to its workers. (torchrun must get one signal: a second one makes it exit
# without waiting for its workers.) The workers stop at the next micro-batch, rank 0 writes
# last.pt and requeues the job (scontrol requeue), and the requeued job runs this script again:
# --resume auto continues from the checkpoint. On preemption SLURM sends SIGTERM to the job's
# processes, which torchrun passes on in the same way. Needs torch >= 2.9 (torchrun's
# --signals-to-handle and --shutdown-timeout); docs/TRAINING.md says what to do with an older one.
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16           # the node's cores for its workers and their data loaders
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300

export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"  # srun no longer inherits --cpus-per-task (Slurm >= 22.05)
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun_pid=
trap '[ -n "$srun_pid" ] && kill -USR1 "$srun_pid"' USR1
# --shutdown-timeout: how long torchrun waits for its workers after passing a signal on, before
# it kills them; it must exceed one micro-batch and one checkpoint save (the log's "written N s
# after the signal" says how long they took), and --signal's lead must exceed it.
srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc-per-node=gpu \
    --rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts=3 \
    --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 --shutdown-timeout=120 \
    -m ddep "$@" --resume auto &
srun_pid=$!
trap '' TERM  # (after srun started: it would inherit it) preemption signals the tasks itself: wait for them
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal ended the wait early: wait again
    wait "$srun_pid"
    status=$?
done
exit "$status"
