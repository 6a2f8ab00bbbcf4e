"""The embedded demo: synthetic shapes data, the small CNN trained on it, and the files shipped in
``data/``. Not on the runtime path of ``run``; ``python -m gradcam_batch.engine.demo.assets`` rebuilds them."""
