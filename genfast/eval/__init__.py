"""Evaluation: the embedded attribute classifier, prompt accuracy, figures."""
