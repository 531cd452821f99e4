"""Runnable examples of pai-usage (`python -m examples.ad_creator`)."""
