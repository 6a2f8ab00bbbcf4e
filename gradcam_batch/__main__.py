"""``python -m gradcam_batch`` is the same as the ``gradcam-batch`` script."""

from gradcam_batch.cli import main

if __name__ == "__main__":
    main()
