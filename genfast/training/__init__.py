"""Training loops on accelerate: resumable, atomic checkpoints, progress bars."""
