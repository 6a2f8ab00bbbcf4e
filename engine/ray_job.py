"""The former home of the Ray Data runner, kept so that ``from gradcam_batch.engine.ray_job import
explain_dataset`` goes on working; the code lives in ``engine/job/ray_runner.py``."""

from gradcam_batch.engine.job.ray_runner import *  # noqa: F403
from gradcam_batch.engine.job.ray_runner import __all__  # noqa: F401
