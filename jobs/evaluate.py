"""Stage `evaluate`: score the models on the held-out eval set and apply the evaluation gate.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill import evaluate, stage

if __name__ == "__main__":
    stage.main(evaluate.run_stage)
