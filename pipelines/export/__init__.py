"""Biomarker tables for statisticians, and group comparisons."""
