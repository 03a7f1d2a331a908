"""Named pipelines of ``pipelines.yaml``: the stages in order, each skipped when its key matches its marker.

``runner``: the loop (key -> skip / resume / clear -> run -> marker), markers, the pipeline's
folders and lock; ``stages``: the table of stages (what goes into each key, what each runs with,
what each marker records). The Prefect flow ``vaemo_pipeline`` (flows/pipeline.py) runs every
step as a subflow.
"""

from vaemo.pipeline.runner import (
                                   PipelineFailed,
                                   Plan,
                                   Recorder,
                                   Step,
                                   StepFailed,
                                   StepOutcome,
                                   StepRefused,
                                   layout,
                                   one_run_at_a_time,
                                   preflight,
                                   read_marker,
                                   run_pipeline,
)
from vaemo.pipeline.stages import STAGES

__all__ = ["STAGES", "PipelineFailed", "Plan", "Recorder", "Step", "StepFailed", "StepOutcome", "StepRefused", "layout",
           "one_run_at_a_time", "preflight", "read_marker", "run_pipeline"]
