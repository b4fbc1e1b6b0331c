#!/usr/bin/env bash
# Submits the whole chain to Slurm and prints the job ids: the ingest array (one task per part),
# the merge once every part has succeeded, and, with VTR_CAPTIONS, the scoring once the merge
# has. A job whose dependency fails is cancelled (--kill-on-invalid-dep=yes). After a time
# limit, a node failure or scancel, run this again with the same settings: finished parts have
# nothing new and take seconds, the others continue from their last commit.
#
#   VTR_PARTS=16 VTR_ROOTS="/data/videos /data/more" VTR_WORK=/shared/vtr \
#   VTR_MODEL=/models/clip4clip/pytorch_model.bin.4 [VTR_CAPTIONS=/data/captions.csv] \
#   bash pipelines/slurm/submit.sh [sbatch flags for every job, e.g. --partition=cpu --cpus-per-task=4]
#
# The jobs ask for 8 CPUs each (the merge 1); flags given here override that, and anything else
# their #SBATCH lines set.
set -euo pipefail
: "${VTR_PARTS:?set VTR_PARTS}" "${VTR_ROOTS:?set VTR_ROOTS}" "${VTR_WORK:?set VTR_WORK}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$VTR_WORK/logs"
cd "$VTR_WORK/logs"
ingest=$(sbatch --parsable --export=ALL "$@" --array="0-$((VTR_PARTS - 1))" "$here/ingest.sbatch")
merge=$(sbatch --parsable --export=ALL "$@" --dependency="afterok:$ingest" --kill-on-invalid-dep=yes "$here/merge.sbatch")
echo "ingest $ingest"
echo "merge $merge"
if [ -n "${VTR_CAPTIONS:-}" ]; then
  score=$(sbatch --parsable --export=ALL "$@" --dependency="afterok:$merge" --kill-on-invalid-dep=yes "$here/score.sbatch")
  echo "score $score"
fi
