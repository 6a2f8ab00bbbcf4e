"""The harness of ``gradcam-batch bench``: side-by-side timings against inference and other libraries.
Not on the runtime path of ``run``."""

INFERENCE = "inference"
INFERENCE_COMPILED = "inference[compiled]"
OURS = "gradcam-batch"
END_TO_END = "gradcam-batch run"
PYTORCH_GRAD_CAM = "pytorch-grad-cam"
CAPTUM = "captum"
TORCHCAM = "torchcam"
BASELINES = (INFERENCE, PYTORCH_GRAD_CAM, CAPTUM)
# `bench --methods`: each method against the libraries that have it (engine/bench/methods.py).
METHOD_BASELINES = (INFERENCE, PYTORCH_GRAD_CAM, TORCHCAM)
