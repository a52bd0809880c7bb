"""Stage 3, conformance: does the study meet the trial's protocol?

findings    the Finding (one deviation) and the deviations and queries rows it becomes
parameters  acquisition parameters of a series, from classic and enhanced DICOM
protocol    series types, parameter tolerances, the scanner and its epoch, completeness
visits      which visit of the schedule a study belongs to, and its window
infer       draft a protocol section from a site's qualification scan
"""
