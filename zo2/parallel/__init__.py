"""Many GPUs (DistZO2, DESIGN.md §3). So far: the cost model of the layouts, :mod:`zo2.parallel.plan`."""

from zo2.parallel.plan import (Layout, ModelShape, Prediction, Rates, Workload, calibrate, predict, predict_layout,
                               scaling_table)

__all__ = ["Layout", "ModelShape", "Prediction", "Rates", "Workload", "calibrate", "predict", "predict_layout",
           "scaling_table"]
