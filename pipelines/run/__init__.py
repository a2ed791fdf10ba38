"""A protocol run, study by study: the steps a flow task each calls, with their bookkeeping.

Every step takes one study (by its row in the index), skips itself when the index holds its
outcome for the same input content, settings and method version, and otherwise runs one
pipeline (anonymize, deface, qc, convert, volumetry) on that study's folder and records the
outcome. Plain Python: the flows in ``flows/`` call these, and so can anyone without Prefect.
"""
