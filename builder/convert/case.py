"""The aligned case on disk (docs/contracts.md section 3): write it atomically, read it back.

``WORK/cases/<case_id>/{ct,pet,label}.nii.gz + case.json``. NIfTI files carry the RAS affine
(sform = qform, code 1 "scanner"), no text in ``descrip``/``aux_file``/``intent_name``/``db_name``,
and are gzip-compressed without a timestamp or file name, so the same case gives the same bytes
on every run. A case folder is written under a temporary name next to its final place and renamed
into place, so an interrupted run never leaves a half-written case that looks whole.

Example:
    >>> folder = write_case(work / "cases", case_json, ct=ct, pet=pet, label=label, affine_ras=aff)  # doctest: +SKIP
    >>> load_case(folder)["case_id"]  # doctest: +SKIP
    'LA-3f9c2a1b'
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import nibabel as nib
import numpy as np

from lymphatlas_ds import _io
from lymphatlas_ds._io import read_json
from lymphatlas_ds.errors import SchemaError
from lymphatlas_ds.schema import (CASE_FILES, CASE_JSON, CT_DTYPE, INSTANCES_DTYPE, INSTANCES_FILE, LABEL_DTYPE,
                                  PET_DTYPE, SCHEMA_VERSION)

logger = logging.getLogger(__name__)

GZIP_LEVEL = 1
"""Level 1: several times faster than the default 6 on CT/PET volumes for ~10 % larger files; the
release re-compresses everything with zstd anyway."""

try:  # ISA-L's gzip: the same format, ~6x faster than zlib at level 1 (measured on PET float32)
    from isal import igzip as _gzip_impl

    _GzipFile = _gzip_impl.IGzipFile
except ImportError:  # pragma: no cover - isal is in the builder extra; plain zlib still works
    _GzipFile = gzip.GzipFile
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
REQUIRED_KEYS = ("schema_version", "case_id", "subject_id", "clinical", "geometry", "alignment", "lesions", "qc",
                 "source", "content_hash")
_DTYPES = {"ct": CT_DTYPE, "pet": PET_DTYPE, "label": LABEL_DTYPE}


def content_hash(ct: np.ndarray, pet: np.ndarray, label: np.ndarray, affine_ras: np.ndarray) -> str:
    """sha256 over the voxels of ct, pet, label and the float64 RAS affine (the release's recipe)."""
    from lymphatlas_ds.manifest import content_hash as _release_hash

    return _release_hash(ct, pet, label, np.asarray(affine_ras, np.float64))


def nifti_image(array_zyx: np.ndarray, affine_ras: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image of a [z, y, x] array with an RAS affine, identifying header fields empty."""
    img = nib.Nifti1Image(array_zyx.T, np.asarray(affine_ras, np.float64))  # .T: a view, x fastest on disk
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras, code=1)
    hdr = img.header
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
        hdr[field] = b""
    hdr.set_xyzt_units("mm", "sec")
    img.update_header()
    hdr["vox_offset"] = 352  # single-file NIfTI-1: 348-byte header + 4-byte (empty) extension flag
    return img


def write_nifti(path: Path, array_zyx: np.ndarray, affine_ras: np.ndarray, *, level: int = GZIP_LEVEL) -> None:
    """Write ``array_zyx`` as a deterministic ``.nii.gz`` (no gzip mtime / name) at ``path``."""
    img = nifti_image(array_zyx, affine_ras)
    with open(path, "wb") as raw, _GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz:
        img.header.write_to(gz)  # 348 bytes + the 4-byte extension flag (no extensions)
        gz.write(b"\0" * (int(img.header["vox_offset"]) - gz.tell()))
        # C-ordered [z, y, x] is exactly NIfTI's x-fastest voxel order: no copy
        gz.write(np.ascontiguousarray(array_zyx).data)


def write_case(
    cases_dir: Path,
    case_json: dict,
    *,
    ct: np.ndarray,
    pet: np.ndarray,
    label: np.ndarray,
    affine_ras: np.ndarray,
    level: int = GZIP_LEVEL,
    check: Callable[[Path], None] | None = None,
    extra_files: dict[str, str] | None = None,
    instances: np.ndarray | None = None,
) -> Path:
    """Write one aligned case atomically into ``cases_dir/<case_id>/`` and return that folder.

    Fills ``content_hash`` in ``case_json``. An existing folder of the same case is replaced.
    ``check(folder)`` runs on the complete temporary folder before it is renamed into place
    (the de-identification leak check); if it raises, nothing is published. ``extra_files``
    ({name: text}) are written beside case.json (the applied transform, ``transform.tfm``).
    ``instances`` (the label's uint16 lesion instance map, ``label_instances``) goes to ``instances.nii.gz``.

    Example:
        >>> write_case(tmp / "cases", {"case_id": "LA-00000001", ...}, ct=ct, pet=pet, label=lab, affine_ras=a)  # doctest: +SKIP
    """
    arrays = {"ct": ct, "pet": pet, "label": label}
    for name, arr in arrays.items():
        if arr.dtype != np.dtype(_DTYPES[name]):
            raise SchemaError(f"{name} must be {_DTYPES[name]}, got {arr.dtype} (case {case_json.get('case_id')})")
        if arr.shape != ct.shape:
            raise SchemaError(f"{name} shape {arr.shape} != ct shape {ct.shape} (case {case_json.get('case_id')})")
    if instances is not None:
        _check_instances(instances, label, case_json.get("case_id"))
        arrays = dict(arrays, instances=instances)
    case_id = case_json["case_id"]
    cases_dir.mkdir(parents=True, exist_ok=True)
    final = cases_dir / case_id
    tmp = cases_dir / f"{TMP_PREFIX}{case_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # zlib and sha256 release the GIL: the three files compress while the hash runs
        with ThreadPoolExecutor(max_workers=4) as pool:
            digest = pool.submit(content_hash, ct, pet, label, affine_ras)  # instances derive from label: not hashed
            futures = [pool.submit(write_nifti, tmp / CASE_FILES.get(name, INSTANCES_FILE), arr, affine_ras, level=level)
                       for name, arr in arrays.items()]
            for fut in futures:
                fut.result()
            case_json = dict(case_json, content_hash=digest.result())
        (tmp / CASE_JSON).write_text(json.dumps(case_json, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_instances(instances: np.ndarray, label: np.ndarray, case_id: str | None) -> None:
    """Refuse an instance map that is not uint16 on the label's grid, or not the label voxel for voxel."""
    if instances.dtype != np.dtype(INSTANCES_DTYPE) or instances.shape != label.shape:
        raise SchemaError(f"instances must be {INSTANCES_DTYPE} {label.shape}, got {instances.dtype} {instances.shape} "
                          f"(case {case_id})")
    if not np.array_equal(instances > 0, label > 0):
        raise SchemaError(f"the instance map of case {case_id} differs from its label: "
                          "compute it with lymphatlas_ds.lesions.label_instances(label)")


def replace_folder(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (renames only; the old one as OLD_PREFIX)."""
    _io.replace_folder(src, dst, old_prefix=OLD_PREFIX)


def remove_case(cases_dir: Path, case_id: str) -> bool:
    """Remove a case folder (renamed away first, so it vanishes at once); True if there was one."""
    folder = cases_dir / case_id
    if not folder.exists():
        return False
    trash = folder.with_name(f"{OLD_PREFIX}{case_id}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def clean_leftovers(cases_dir: Path) -> list[str]:
    """Delete temporary folders an interrupted run left in ``cases_dir``; their names."""
    removed = []
    if cases_dir.is_dir():
        for p in cases_dir.iterdir():
            if p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def read_case_json(folder: Path) -> dict:
    """The parsed ``case.json`` of a WORK case folder, unchecked; SchemaError naming the file when it
    is missing or not JSON. The one place that reads it: :func:`load_case` (which validates it), the
    convert's skip of unchanged exams and the QC report."""
    return read_json(Path(folder) / CASE_JSON, what="the case.json of an aligned case folder",
                     fix="run `python -m builder convert` (again, if this exam was converted before)")


def load_case(path: Path, *, arrays: bool = False) -> dict:
    """Read one aligned case folder: its ``case.json`` (validated), optionally the volumes.

    With ``arrays=True`` the dict gains ``"arrays": {"ct", "pet", "label"}`` ([z, y, x], contract
    dtypes) and ``"affine_ras"`` (4x4 numpy, from the NIfTI header). ``"folder"`` is the path.

    Example:
        >>> case = load_case(work / "cases" / "LA-3f9c2a1b", arrays=True)  # doctest: +SKIP
        >>> case["arrays"]["pet"].dtype  # doctest: +SKIP
        dtype('float32')
    """
    path = Path(path)
    json_path = path / CASE_JSON
    case = read_case_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in case]
    if missing:
        raise SchemaError(f"{json_path} lacks {', '.join(missing)}; re-run the convert with this builder version")
    if str(case["schema_version"]).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise SchemaError(
            f"{json_path} has schema_version {case['schema_version']}, this builder reads {SCHEMA_VERSION}; re-convert"
        )
    for name in CASE_FILES.values():
        if not (path / name).is_file():
            raise SchemaError(f"{path / name} is missing; re-run the convert for this case")
    case["folder"] = str(path)
    if arrays:
        volumes = read_volumes(path)
        case["arrays"] = {n: np.ascontiguousarray(a).astype(_DTYPES[n], copy=False) for n, (a, _) in volumes.items()}
        case["affine_ras"] = volumes["ct"][1]
    return case


class CaseFileError(SchemaError):
    """A volume of a WORK case folder is missing, unreadable or not 3-D; the message names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}; re-run convert for this case")
        self.path = path


def read_volumes(folder: Path, names: Iterable[str] = tuple(CASE_FILES)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ct / pet / label volumes of a WORK case folder: ``{name: (array, header RAS affine)}``.

    Arrays are ``[z, y, x]`` views in the stored dtype (``dataobj``; ``get_fdata`` would give
    float64). The one reader of a case's NIfTI files: :func:`load_case`, the release
    (``builder.release.build.read_case_volumes``) and the QC report use it, each adding its checks.
    ``names`` reads only those volumes (the release reads one at a time to bound its memory).
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        file = CASE_FILES[name]
        path = Path(folder) / file
        try:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
        except FileNotFoundError as e:
            raise CaseFileError(path, "is missing") from e
        except Exception as e:  # nibabel / zlib raise several types on a corrupt file
            raise CaseFileError(path, f"cannot be read ({e})") from e
        if data.ndim != 3:
            raise CaseFileError(path, f"is {data.ndim}-D, expected a 3-D volume")
        out[name] = (data.transpose(2, 1, 0), image.affine)
    return out
