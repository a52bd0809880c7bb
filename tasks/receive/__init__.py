"""Stage 4, receiving a study: stages 1-3 on one study at arrival, and what they decided.

study   one study of an upload: identify, de-identify and verify each series, check the
        protocol, quarantine what is refused (the body of the receive_study flow)
record  StudyOutcome, and its rows in the studies, series, deviations and queries tables
"""
