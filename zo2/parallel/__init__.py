"""Many GPUs (DistZO2, DESIGN.md §3). So far: the cost model of the layouts, :mod:`zo2.parallel.plan`."""

from zo2.parallel.plan import predict, scaling_table
from zo2.parallel.plan_calibration import calibrate
from zo2.parallel.plan_inputs import Layout, ModelShape, Rates, Workload
from zo2.parallel.plan_model import predict_layout
from zo2.parallel.plan_results import Prediction

__all__ = ["Layout", "ModelShape", "Prediction", "Rates", "Workload", "calibrate", "predict", "predict_layout",
           "scaling_table"]
