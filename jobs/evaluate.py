"""Stage `evaluate`: score the models on the held-out eval set and apply the evaluation gate.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages import evaluate

if __name__ == "__main__":
    stage.main(evaluate.run_stage)
