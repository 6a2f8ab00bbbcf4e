"""``python -m gradcam_batch`` is the same as the ``gradcam-batch`` script.

``-m`` puts the working directory first on ``sys.path``; run from a checkout, that is the source
root, whose ``kernels/`` folder would shadow Hugging Face's ``kernels`` (``gradcam_batch.source_root``).
"""

from gradcam_batch.source_root import drop_source_root

drop_source_root()

from gradcam_batch.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
