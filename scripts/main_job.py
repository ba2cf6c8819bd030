"""The main job (README quick start, ``make demo``): the whole release, for real, in minutes on a CPU.

    python scripts/main_job.py                         # ~6-9 min on 2 CPU cores
    python scripts/main_job.py --quick                 # a shortened smoke run (~1-2 min)
    python scripts/main_job.py --attention softmax --output_dir outputs/main_job_softmax

Stages: data, train (training/dino.py under accelerate launch), knn, segmentation, analysis, hub (model card
and Hub folder, reloaded in a fresh process and checked against the trained model). A stage finished with
the same inputs is skipped when the job runs again (``--force`` reruns everything); the summary is printed and
written to ``OUTPUT_DIR/summary.json``. Keys: entmax_vit.jobs.main_job.MainJobConfig.
"""

from entmax_vit.cli.entry_point import run
from entmax_vit.jobs.main_job import MainJobConfig, main

if __name__ == "__main__":
    run(main, MainJobConfig, "main_job", description=__doc__)
