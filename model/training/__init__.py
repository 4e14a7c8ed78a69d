"""Training the bundled default model: corpus and document streams (corpus.py), the loop and CLI (train.py),
streamed evaluation by position in a document (evaluate.py), samples (sample.py)."""
