"""Projections of speckv's mechanisms onto hardware we do not have (issue F10):
hardware profiles with their sources (`hardware`), model shapes (`shapes`), the step
model (`roofline`) and `speckv simulate` (`simulate`)."""

from speckv.sim.hardware import Hardware, load as load_profile, probe_cpu
from speckv.sim.roofline import Breakdown, Mechanisms, Step, step_time
from speckv.sim.shapes import ModelShape, load as load_shape
from speckv.sim.simulate import project_trace, project_workload

__all__ = ["Breakdown", "Hardware", "Mechanisms", "ModelShape", "Step", "load_profile",
           "load_shape", "probe_cpu", "project_trace", "project_workload", "step_time"]
