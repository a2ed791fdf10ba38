"""The DICOM ground floor the stages build on: header values as plain attributes, the rule
language of the protocol file, and series roles decided from acquisition physics."""
