"""Stage `annotate`: the teacher labels the search log (label + reasoning) with Ray Data and an autoscaled
pool of vLLM or transformers replicas; sharded, resumable, nothing lost.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages import annotate

if __name__ == "__main__":
    stage.main(annotate.run_stage)
