"""Calibration, the stage after data: one pass over calibration data records every statistic any
criterion needs, as a Profile of sums that merge across shards, processes and sessions (`profile`);
instrumented layers (`instrument`), in memory (`run`), one decoder layer at a time from disk
(`sequential`) or data-parallel (`distributed`)."""

from moetrim.calibrate.profile import Profile, load_profile
from moetrim.calibrate.run import calibrate

__all__ = ["Profile", "load_profile", "calibrate"]
