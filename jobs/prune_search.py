"""Stage `prune-search`: prune the teacher with an accuracy predictor over sampled per-layer architectures
(arXiv 2309.09507), evaluated as Ray Tune trials; the uniform baseline at the same parameter count.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages import prune_search

if __name__ == "__main__":
    stage.main(prune_search.run_stage)
