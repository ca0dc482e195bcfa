"""Training and fine-tuning Leffa models (the trainer, ``trainer.py``, and the dataset layouts,
``datasets.py``). An application of the model library: it uses ``leffa`` and, to read dataset
images as the app does, ``preprocess.images``."""
