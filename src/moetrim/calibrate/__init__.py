"""Calibration: one pass over data records every statistic any criterion needs, as a Profile."""

from moetrim.calibrate.profile import Profile, load_profile
from moetrim.calibrate.run import calibrate

__all__ = ["Profile", "load_profile", "calibrate"]
