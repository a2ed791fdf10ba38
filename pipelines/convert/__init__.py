"""DICOM series to NIfTI with an anonymized JSON sidecar, in a BIDS-style folder.

dcm2niix converts (``dcm2niix``), SimpleITK's series reader is the fallback (``sitk``); every
result is checked against the geometry and pixels of the DICOM it came from (``check``, pure);
the sidecar keeps an allowlist of acquisition keys only (``sidecar``); names and folders follow
BIDS (``bids``); ``folder`` converts the series a protocol selects in a folder of studies:
``plan`` says which series and under which names, ``series`` reads a series' files,
``converters`` runs the converters and chooses their image, ``results`` holds what it gives.
"""
