"""Synthetic PET/CT cohorts with exact ground truth, for tests, benchmarks and tools.

``cohort`` writes a DICOM source folder (``generate_cohort``) built from ``exam`` (one exam's
volumes, lesions and misalignment), ``anatomy`` (body, organs, nodes) and ``dicom`` (CT, PET and
SEG writers). ``fake_work`` writes WORK cases with known arrays directly (no DICOM) and
``phantoms`` samples analytic spheres for resampling checks. Nothing here is imported by the
client or by the converter; ``python -m builder synth`` is the command-line entry.
"""
