"""What the node and the replays agree on about frames, without ROS: the frame counters the node reports in
its diagnostics, the status that carries them and its period, and when a GPS fix or a heading is fresh enough
to be a hint. node.py publishes them, replay.py (offline) and live_replay.py (reading the node's diagnostics)
use them."""
from __future__ import annotations

# Every received frame ends processed, dropped (replaced by a newer one before it was processed: latest frame
# wins), bad (undecodable) or errors (failed while localising); lost = frames the middleware lost before they
# reached the node; fixes / bad_fixes = GPS fixes received usable / unusable as a hint; headings / bad_headings =
# orientation messages (heading_source) usable / unusable as a heading hint; odometry / bad_odometry = odometry
# messages (`odometry: true`) usable / unusable as the filter's velocity; filter_rejected = estimates the temporal
# filter (`filter: true`) did not believe (gated out); filter_weak = estimates too vague to fuse (ambiguous places);
# verification_fired / verification_changed = frames where geometric verification (`geometric: true`) found strong
# and decisive evidence / changed the top 1.
COUNTERS = ("received", "lost", "processed", "dropped", "bad", "errors", "fixes", "bad_fixes", "headings",
            "bad_headings", "odometry", "bad_odometry", "filter_rejected", "filter_weak", "verification_fired",
            "verification_changed")
STATUS_NAME = "vpr_localizer: pipeline"   # the DiagnosticStatus name of the node's counters and latencies
DIAGNOSTICS_PERIOD_S = 1.0                # on the steady clock
GPS_MAX_AGE_S = 2.0                       # default of the node's gps_max_age_s and of the offline replay
HEADING_MAX_AGE_S = 0.5                   # default of the node's heading_max_age_s (orientations come at IMU rates)
ODOMETRY_MAX_AGE_S = 0.5                  # default of the node's odometry_max_age_s (odometry comes at 10-100 Hz)


def fresh_fix(fix_stamp_s: float, image_stamp_s: float, max_age_s: float = GPS_MAX_AGE_S) -> bool:
    """Whether a GPS fix (or heading) is used as the hint of a camera frame: its stamp is within `max_age_s` of
    the image's,
    either way (both stamps in one time base: a bag's or /clock's under sim time, else the sensors')."""
    return abs(image_stamp_s - fix_stamp_s) <= max_age_s
