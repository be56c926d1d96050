"""Convert stages: a DICOM source folder -> aligned WORK cases.

discover -> read -> suv -> align -> labels/lesions -> qc -> deid/clinical -> case, run per exam
by ``pipeline``.
"""
