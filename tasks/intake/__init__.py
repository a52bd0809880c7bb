"""Stage 1, intake: what arrived and whose it is.

inventory  walk an upload (folders, .gz, zip), hash every file, parse and check it, reject
           what cannot be read (each rejection names the file and the problem)
custody    the raw copy in the inbox, quarantine with a reason file, release once verified
identify   the trial subject of a PatientID (roster or keyed pseudonym), the study date,
           the patient characteristics a trial retains
derived    the scanner's computed images (ADC, trace, MPR) in an acquired series, kept apart
placeholders  values that stand where an identifier was left out (``***``, ``ANONYMOUS``, ...)
heap       holding Python's garbage collector while a study's headers pile up
receiver   the DICOM Storage SCP: sites push studies, each instance lands in the inbox at once
watch      the upload drop watcher: uploads/<site>/<upload>/ of a folder or an S3 prefix, handed
           over once a READY marker or a quiet period says it is complete
"""
