#!/usr/bin/env bash
# Submits the whole chain to Slurm and prints the job ids: the ingest array (one task per part),
# the merge once every part has succeeded, and, with VTR_CAPTIONS, the captions' encoding and
# their scoring after it: on one node, or with VTR_SCORE_PARTS=M split in M parts (a stats
# array, a rank array, a finish job). A job whose dependency fails is cancelled
# (--kill-on-invalid-dep=yes). After a time limit, a node failure or scancel, run this again
# with the same settings: finished parts have nothing new and take seconds, finished score
# stages are done at once, and the rest continue from their last commit.
#
#   VTR_PARTS=16 VTR_ROOTS="/data/videos /data/more" VTR_WORK=/shared/vtr \
#   VTR_MODEL=/models/clip4clip/pytorch_model.bin.4 \
#   [VTR_CAPTIONS=/data/captions.csv [VTR_SCORE_PARTS=8] [VTR_SCORE_ARGS="--revise dsl-sym"]] \
#   bash pipelines/slurm/submit.sh [sbatch flags for every job, e.g. --partition=cpu --cpus-per-task=4]
#
# The jobs ask for 8 CPUs each (the merge 1); flags given here override that, and anything else
# their #SBATCH lines set.
set -euo pipefail
: "${VTR_PARTS:?set VTR_PARTS}" "${VTR_ROOTS:?set VTR_ROOTS}" "${VTR_WORK:?set VTR_WORK}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$VTR_WORK/logs"
cd "$VTR_WORK/logs"
after() { echo "--dependency=afterok:$1 --kill-on-invalid-dep=yes"; }
submit() { sbatch --parsable --export=ALL "$@"; }
ingest=$(submit "${@}" --array="0-$((VTR_PARTS - 1))" "$here/ingest.sbatch")
echo "ingest $ingest"
merge=$(submit "${@}" $(after "$ingest") "$here/merge.sbatch")
echo "merge $merge"
if [ -n "${VTR_CAPTIONS:-}" ]; then
  encode=$(submit "${@}" $(after "$merge") "$here/encode.sbatch")
  echo "encode $encode"
  parts=${VTR_SCORE_PARTS:-1}
  if [ "$parts" -gt 1 ]; then
    stats=$(VTR_STAGE=stats submit "${@}" $(after "$encode") --array="0-$((parts - 1))" "$here/score-stage.sbatch")
    rank=$(VTR_STAGE=rank submit "${@}" $(after "$stats") --array="0-$((parts - 1))" "$here/score-stage.sbatch")
    finish=$(VTR_STAGE=finish submit "${@}" $(after "$rank") "$here/score-stage.sbatch")
    echo "stats $stats"
    echo "rank $rank"
    echo "finish $finish"
  else
    score=$(submit "${@}" $(after "$encode") "$here/score.sbatch")
    echo "score $score"
  fi
fi
