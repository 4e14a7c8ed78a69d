"""Training the bundled default model: corpus (corpus.py), the loop and CLI (train.py), samples (sample.py)."""
