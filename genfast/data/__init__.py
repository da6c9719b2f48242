"""Procedural data sets genfast trains and measures on."""
