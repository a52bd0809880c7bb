"""Stage 5, BIDS: the received series become the trial's BIDS raw dataset.

convert   plan a session's series, dcm2niix each one, BIDS names, PHI check, ``dst <- src``
dataset   dataset_description.json, participants, sessions and scans tables
deface    a verified defaced copy of every anat image, as the ``deface`` BIDS derivative
"""
