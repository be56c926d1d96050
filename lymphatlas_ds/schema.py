"""The single source of truth for the dataset's names, dtypes and layout.

Everything that writes or reads a LymphAtlas release (the builder, the shards, the card, the
torch loader, the nnU-Net materializer) imports these names instead of restating them.

Example:
    >>> from lymphatlas_ds.schema import Config, Split, CHANNELS, LABELS
    >>> [c.value for c in Config]
    ['all', 'hl', 'nhl']
    >>> CHANNELS
    ('CT', 'PET')
"""

from __future__ import annotations

import enum

SCHEMA_VERSION = "2.0"
"""Version of the release layout and column set; bumped on any incompatible change.

2.0: the geometry columns carry their axis order (``spacing_xyz``, ``shape_xyz``; 1.0 had ``spacing``
in (x, y, z) and ``shape`` in (z, y, x)).
"""

DATASET_NAME = "LymphAtlas"
RELEASE_FOLDER_NAME = "lymphatlas"
"""The demo release folder name, so that ``load_dataset("lymphatlas")`` works from its parent."""


class Config(str, enum.Enum):
    """Dataset configurations (Hugging Face ``configs:``): every case, Hodgkin, non-Hodgkin."""

    ALL = "all"
    HL = "hl"
    NHL = "nhl"


class Diagnosis(str, enum.Enum):
    """Lymphoma type as written in the clinical table."""

    HL = "HL"
    NHL = "NHL"

    @property
    def config(self) -> Config:
        return Config(self.value.lower())


class Subtype(str, enum.Enum):
    """Published lymphoma subtype: a controlled vocabulary, never free text.

    The entities of the WHO classification of lymphoid neoplasms (2016 revision, the paper's
    reference [2]) that whole-body FDG PET/CT series are made of, plus ``other`` (a WHO entity not
    listed here) and ``unknown`` (not recorded). The builder maps common spellings onto these codes
    (``builder.convert.clinical.SUBTYPE_SYNONYMS``) and rejects anything else; :attr:`diagnosis` says which
    diagnosis a code belongs to (``None`` for other / unknown).

    Example:
        >>> Subtype("nodular sclerosis").diagnosis
        <Diagnosis.HL: 'HL'>
        >>> Subtype.UNKNOWN.diagnosis is None
        True
    """

    # classic Hodgkin lymphoma and nodular lymphocyte-predominant HL
    NODULAR_SCLEROSIS = "nodular sclerosis"
    MIXED_CELLULARITY = "mixed cellularity"
    LYMPHOCYTE_RICH = "lymphocyte-rich"
    LYMPHOCYTE_DEPLETED = "lymphocyte-depleted"
    CLASSIC_HL = "classic HL"  # classic HL, subtype not specified
    NODULAR_LYMPHOCYTE_PREDOMINANT = "nodular lymphocyte-predominant"
    # mature B-cell neoplasms
    DLBCL = "DLBCL"
    FOLLICULAR = "follicular"
    MANTLE_CELL = "mantle cell"
    MARGINAL_ZONE = "marginal zone"
    BURKITT = "Burkitt"
    SMALL_LYMPHOCYTIC = "small lymphocytic"
    LYMPHOPLASMACYTIC = "lymphoplasmacytic"
    PRIMARY_MEDIASTINAL = "primary mediastinal large B-cell"
    HIGH_GRADE_B_CELL = "high-grade B-cell"
    # precursor lymphoid neoplasms
    LYMPHOBLASTIC = "lymphoblastic"
    # mature T- and NK-cell neoplasms
    PTCL = "PTCL"  # peripheral T-cell lymphoma, not otherwise specified
    ANGIOIMMUNOBLASTIC = "angioimmunoblastic T-cell"
    ANAPLASTIC_LARGE_CELL = "anaplastic large cell"
    EXTRANODAL_NK_T = "extranodal NK/T-cell"
    # outside the list
    OTHER = "other"
    UNKNOWN = "unknown"

    @property
    def diagnosis(self) -> Diagnosis | None:
        if self in (Subtype.OTHER, Subtype.UNKNOWN):
            return None
        return Diagnosis.HL if self in _HL_SUBTYPES else Diagnosis.NHL


_HL_SUBTYPES = frozenset(
    {
        Subtype.NODULAR_SCLEROSIS, Subtype.MIXED_CELLULARITY, Subtype.LYMPHOCYTE_RICH, Subtype.LYMPHOCYTE_DEPLETED,
        Subtype.CLASSIC_HL, Subtype.NODULAR_LYMPHOCYTE_PREDOMINANT,
    }
)


class Split(str, enum.Enum):
    """Release splits. Cross-validation folds live inside ``train``."""

    TRAIN = "train"
    TEST = "test"


class Subset(str, enum.Enum):
    """Cross-validation subsets of the train split for a given fold."""

    TRAIN = "train"
    VAL = "val"


class Sex(str, enum.Enum):
    F = "F"
    M = "M"
    O = "O"  # noqa: E741 - DICOM's code for other / unknown


N_FOLDS = 5
TEST_FRACTION = 0.2
"""Fraction of patients held out as the test split in a first release."""

CHANNELS: tuple[str, ...] = ("CT", "PET")
"""Channel order of every image tensor and of nnU-Net's ``_0000`` / ``_0001`` files."""

LABELS: dict[str, int] = {"background": 0, "lesion": 1}
"""Label map (nnU-Net ``dataset.json`` order)."""

IMAGE_COLUMNS: tuple[str, ...] = ("ct", "pet", "label")
"""Nifti columns of a shard row, and file stems of an aligned case (``ct.nii.gz`` ...)."""

CT_DTYPE = "int16"  # Hounsfield units
PET_DTYPE = "float32"  # SUVbw
LABEL_DTYPE = "uint8"  # {0, 1}

ITEM_KEYS: tuple[str, ...] = (
    "image", "label", "case_id", "affine", "spacing_zyx", "meta", "patch_start", "foreground_centred",
)
"""Keys of every torch item (``load_lymphatlas`` and ``hf_torch``, whole cases and patches; docs/contracts.md "Items")."""

AGE_BAND_YEARS = 5
"""Ages are published in bands of this many years (de-identification)."""

# Metadata columns of a shard row and of metadata/cases.csv, with their arrow-ish types.
# ("list<float64>[3]" means a fixed list of 3 float64.)
METADATA_COLUMNS: dict[str, str] = {
    "case_id": "string",
    "subject_id": "string",
    "diagnosis": "string",  # HL | NHL
    "subtype": "string",  # a Subtype code (controlled vocabulary)
    "sex": "string",  # F | M | O
    "age_band": "string",  # e.g. "45-49"
    "exam_index": "int32",  # 0 = the patient's first exam in the dataset
    "days_from_first_exam": "int32",
    "split": "string",  # train | test
    "fold": "int32",  # 0..4 for train cases, -1 for test cases
    # Geometry, all in the NIfTI axis order of the Nifti cells and the affine: (x, y, z).
    "spacing_xyz": "list<float64>[3]",  # mm, the CT grid
    "shape_xyz": "list<int32>[3]",  # voxels, as nibabel reports a volume's shape
    "affine": "list<float64>[16]",  # 4x4 RAS affine mapping (x, y, z) voxel indices to mm, row-major
    "ct_manufacturer": "string",
    "ct_model": "string",
    "pet_manufacturer": "string",
    "pet_model": "string",
    "suv_factor": "float64",  # activity (Bq/ml) * suv_factor = SUVbw
    "registration": "string",  # scanner | rigid | rigid+bspline
    "lesion_count": "int32",
    "tmtv_ml": "float64",
    "tlg": "float64",  # total lesion glycolysis, ml * SUV
    "suv_max": "float64",
    "dmax_mm": "float64",
    "content_hash": "string",  # sha256 over the case's ct/pet/label voxels and geometry
}

CASE_FILES: dict[str, str] = {name: f"{name}.nii.gz" for name in IMAGE_COLUMNS}
CASE_JSON = "case.json"

# --- lesion instances, the `lesions` config and the `preview` config (issue 22) ----------------
INSTANCES_FILE = "instances.nii.gz"
"""The aligned case's lesion instance map (uint16, :mod:`lymphatlas_ds.lesions`) beside ``label.nii.gz``."""
INSTANCES_DTYPE = "uint16"

LESIONS_CONFIG = "lesions"
"""The config of one row per lesion (``load_dataset(repo, "lesions")``), files ``lesions/<split>-*.parquet``."""
PREVIEW_CONFIG = "preview"
"""The Hub viewer's config: PNG images and the metadata columns, files ``preview/<split>-*.parquet``."""
PREVIEW_GALLERY_DIR = "preview/gallery"
"""PNG MIPs the card shows (a few cases of the release)."""


class BodyRegion(str, enum.Enum):
    """Where a lesion lies, from the CT (:func:`builder.convert.lesions.body_regions` gives the rule)."""

    HEAD_NECK = "head-neck"
    THORAX = "thorax"
    ABDOMEN = "abdomen"
    PELVIS = "pelvis"
    LIMBS = "limbs"
    UNKNOWN = "unknown"  # no lungs found in the CT (a partial field of view): no landmark to place it


# Columns of the lesions config, one row per lesion (bounding boxes in the NIfTI (x, y, z) voxel order
# of the Nifti cells, inclusive; ``lesion_id`` = the lesion's value in the instance map).
LESION_COLUMNS: dict[str, str] = {
    "case_id": "string",
    "subject_id": "string",
    "diagnosis": "string",
    "split": "string",
    "fold": "int32",
    "lesion_id": "int32",
    "voxels": "int64",
    "volume_ml": "float64",
    "suv_max": "float64",  # native PET grid (builder.convert.lesions)
    "suv_peak": "float64",  # native PET grid, 1 ml sphere
    "suv_mean": "float64",  # aligned PET on the CT grid
    "tlg": "float64",  # suv_mean * volume_ml
    "centroid_lps": "list<float64>[3]",  # mm, DICOM patient coordinates
    "bbox_min_xyz": "list<int32>[3]",
    "bbox_max_xyz": "list<int32>[3]",
    "body_region": "string",  # a BodyRegion value
}

PREVIEW_IMAGE_COLUMNS: tuple[str, ...] = ("mip", "fusion")
"""Image columns of the preview config: coronal PET MIP with lesion outlines, axial fusion through the largest lesion."""
PREVIEW_COLUMNS: tuple[str, ...] = ("case_id", "subject_id", "diagnosis", "subtype", "sex", "age_band", "split",
                                    "fold", "lesion_count", "tmtv_ml", "suv_max")
"""Metadata columns of the preview config (a subset of METADATA_COLUMNS)."""
