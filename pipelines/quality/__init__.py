"""The QC stages (header and image) on folders and series: reading files, placing the brain
template, calling the pure checks of ``qc``."""
