"""The byte layout of a volume cell in a release shard, and nothing else knows it.

A shard row holds each volume (``ct``, ``pet``, ``label``) as a ``datasets.Nifti`` cell:
``{"bytes": <an uncompressed NIfTI-1 file>, "path": "<case_id>_<name>.nii"}``. The bytes are not
gzipped because the parquet file is zstd-compressed as a whole: measured on a 512x512x300 case
(``benchmarks/bench_shards.py``), raw NIfTI under zstd is about as small as ``.nii.gz`` and
decodes several times faster. Plain ``datasets`` decodes these cells with nibabel (it gunzips
only when it sees the gzip magic), so any client can read them; :func:`decode_volume` is the fast
path that views the voxels in place instead of copying them through a file object.

Arrays are numpy ``[z, y, x]`` (SimpleITK order); the NIfTI data block is ``[x, y, z]`` in
Fortran order, which is the same memory seen through the reversed axes, so neither direction
copies voxels. Affines are RAS (NIfTI convention), written as sform and qform with code 1
("scanner"); since NIfTI-1 stores them as float32, the exact float64 affine also travels in a
JSON comment extension (``{"lymphatlas_affine_ras": [16 numbers]}``) that :func:`decode_volume`
returns, so the decoded affine equals the case's ``affine`` column bit for bit.

Example:
    >>> import numpy as np
    >>> ct = np.zeros((3, 4, 5), np.int16)
    >>> cell = encode_volume(ct, np.eye(4), "LA-0001_ct")
    >>> cell["path"]
    'LA-0001_ct.nii'
    >>> array, affine = decode_volume(cell)
    >>> array.shape, array.dtype.name
    ((3, 4, 5), 'int16')
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa

from lymphatlas_ds.errors import SchemaError

NIFTI_SUFFIX = ".nii"
_GZIP_MAGIC = b"\x1f\x8b"
AFFINE_KEY = "lymphatlas_affine_ras"
"""Key of the JSON comment extension that carries the float64 affine (NIfTI-1's sform is float32)."""
_COMMENT_CODE = 6  # NIFTI_ECODE_COMMENT


def cell_path(case_id: str, name: str) -> str:
    """The ``path`` of a Nifti cell: ``cell_path("LA-1", "ct") == "LA-1_ct.nii"``."""
    return f"{case_id}_{name}{NIFTI_SUFFIX}"


def encode_volume(array_zyx: np.ndarray, affine_ras: np.ndarray, name: str) -> dict[str, Any]:
    """Turn a ``[z, y, x]`` array and its RAS affine into a ``datasets.Nifti`` cell.

    ``name`` becomes the cell's ``path`` (``.nii`` is appended when missing); use
    :func:`cell_path` for shard rows. The dtype is kept as given (no scaling), so decoding returns
    the identical voxels. The output is deterministic: the same inputs give the same bytes.

    Example:
        >>> cell = encode_volume(np.ones((2, 2, 2), np.uint8), np.eye(4), "x_label")
        >>> sorted(cell)
        ['bytes', 'path']
    """
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise SchemaError(f"volume {name!r}: expected a 3-D [z, y, x] array, got shape {array_zyx.shape}")
    affine = np.asarray(affine_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SchemaError(f"volume {name!r}: expected a 4x4 affine, got shape {affine.shape}")
    # [z, y, x] C-order is [x, y, z] F-order: nibabel writes it without a copy.
    image = nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine)
    header = image.header
    header.set_data_dtype(array_zyx.dtype)
    header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    # No scaling: the stored values are the values (HU, SUV, label).
    header.set_slope_inter(np.nan, np.nan)
    # NIfTI-1 keeps the affine as float32; the exact float64 one travels in a comment extension
    # (ignored by other readers) so that decoding returns the affine the case was built with.
    exact = json.dumps({AFFINE_KEY: [float(v) for v in affine.ravel()]})
    header.extensions.append(nib.nifti1.Nifti1Extension(_COMMENT_CODE, exact.encode()))
    path = name if name.endswith(NIFTI_SUFFIX) else name + NIFTI_SUFFIX
    return {"bytes": image.to_bytes(), "path": path}


def decode_volume(cell: dict[str, Any] | bytes | memoryview, *, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(array_zyx, affine_ras)`` from a Nifti cell (or its bytes).

    Accepts the uncompressed NIfTI-1 bytes written by :func:`encode_volume`, gzipped NIfTI bytes
    (as ``datasets`` allows), or any buffer such as ``pyarrow.BinaryScalar.as_buffer()``. With
    ``copy=False`` the returned array is a read-only view of the given buffer (no voxel copy);
    keep the buffer alive while using it.

    Example:
        >>> cell = encode_volume(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4), "p")
        >>> float(decode_volume(cell)[0][1, 1, 1])
        7.0
    """
    data: Any = cell.get("bytes") if isinstance(cell, dict) else cell
    where = cell.get("path") if isinstance(cell, dict) else None
    if data is None:
        raise SchemaError(f"Nifti cell {where!r} has no bytes; releases embed the volume bytes in the shard")
    buffer = memoryview(data).cast("B")
    if bytes(buffer[:2]) == _GZIP_MAGIC:
        buffer = memoryview(gzip.decompress(buffer))
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(buffer[:348]), check=True)
    except Exception as e:  # nibabel raises several types for a bad header
        raise SchemaError(f"Nifti cell {where!r} is not a NIfTI-1 file ({e}); re-download the shard") from e
    shape_xyz = header.get_data_shape()
    if len(shape_xyz) != 3:
        raise SchemaError(f"Nifti cell {where!r}: expected a 3-D volume, header says shape {shape_xyz}")
    dtype = header.get_data_dtype()
    offset = int(header["vox_offset"])
    affine = _exact_affine(buffer, offset, header.get_best_affine())
    count = int(np.prod(shape_xyz))
    if offset + count * dtype.itemsize > len(buffer):
        raise SchemaError(
            f"Nifti cell {where!r} is truncated: {len(buffer)} bytes, the header needs "
            f"{offset + count * dtype.itemsize}; re-download the shard"
        )
    voxels = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    array = voxels.reshape(shape_xyz, order="F").transpose(2, 1, 0)
    slope, inter = header.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        # Cells written by another tool may carry scaling; honour it as nibabel would.
        array = array * slope + (inter or 0)
    elif copy or not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="), copy=True)
    return array, affine


def _exact_affine(buffer: memoryview, offset: int, sform: np.ndarray) -> np.ndarray:
    """The float64 affine of the comment extension when present and consistent with the sform."""
    if offset <= 352:
        return sform
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(buffer[:offset]), check=False)
    except Exception:  # extensions unreadable: the sform is still right to float32 precision
        return sform
    for extension in header.extensions:
        if extension.get_code() != _COMMENT_CODE:
            continue
        try:
            values = json.loads(extension.get_content())[AFFINE_KEY]
            exact = np.asarray(values, dtype=np.float64).reshape(4, 4)
        except (ValueError, KeyError, TypeError):
            continue
        # A header edited after writing (new sform, stale comment) must not win.
        if np.allclose(exact, sform, rtol=1e-6, atol=1e-3):
            return exact
    return sform


def cell_bytes(table: pa.Table, name: str, *, where: str = "") -> pa.Buffer:
    """The NIfTI bytes of the first row's ``name`` cell, as a zero-copy slice of the arrow data buffer.

    ``table.column(name)[0]["bytes"].as_buffer()`` would copy the whole volume (a scalar owns its
    value); slicing the binary array's data buffer by its offsets does not.
    """
    column = table.column(name)
    if column.num_chunks == 0 or len(column) == 0:
        raise SchemaError(f"{where}: no {name} cell in the shard row")
    values = column.chunk(0).field("bytes")
    if values.null_count and not values.is_valid()[0].as_py():
        raise SchemaError(f"{where}: its {name} cell has no bytes; releases embed the volume bytes in the shard")
    _, offsets, data = values.buffers()
    large = pa.types.is_large_binary(values.type)
    positions = np.frombuffer(offsets, dtype=np.int64 if large else np.int32)
    start, stop = int(positions[values.offset]), int(positions[values.offset + 1])
    return data.slice(start, stop - start)
