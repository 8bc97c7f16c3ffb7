"""Recording: the Recorder packs the routed layers' device accumulators at interval ends and hands them
to the store's writer; distributed.py sums them over ranks so that one rank writes."""

from routescope.record.recorder import Recorder, RecorderError

__all__ = ["Recorder", "RecorderError"]
