"""The byte layout of a volume cell in a release shard, and nothing else knows it.

A shard row holds each volume (``ct``, ``pet``, ``label``) as a ``datasets.Nifti`` cell:
``{"bytes": <a gzipped NIfTI-1 file>, "path": "<case_id>_<name>.nii.gz"}``. The cells are
compressed themselves (gzip, written with ISA-L's fast deflate) and the parquet file stores them
as they are, so a row group's size in the parquet metadata (``total_byte_size``, what the Hub's
dataset viewer checks against its 286 MiB limit) is the compressed size of the case, not its raw
voxels. Measured on a synthetic 512x512x300 case (``benchmarks/bench_shards.py``): about 1.03x the
bytes of raw NIfTI under parquet zstd-3, encoded 1.5-3x faster. Plain ``datasets`` decodes these
cells with nibabel (it gunzips when it sees the gzip magic), so any client can read them;
:func:`decode_volume` inflates straight into the array it returns (no second copy) and also
accepts raw NIfTI cells (releases before this layout).

Arrays are numpy ``[z, y, x]`` (SimpleITK order); the NIfTI data block is ``[x, y, z]`` in
Fortran order, which is the same memory seen through the reversed axes, so neither direction
transposes voxels. Affines are RAS (NIfTI convention), written as sform and qform with code 1
("scanner"); since NIfTI-1 stores them as float32, the exact float64 affine also travels in a
JSON comment extension (``{"lymphatlas_affine_ras": [16 numbers]}``) that :func:`decode_volume`
returns, so the decoded affine equals the case's ``affine`` column bit for bit.

Example:
    >>> import numpy as np
    >>> ct = np.zeros((3, 4, 5), np.int16)
    >>> cell = encode_volume(ct, np.eye(4), "LA-0001_ct")
    >>> cell["path"]
    'LA-0001_ct.nii.gz'
    >>> array, affine = decode_volume(cell)
    >>> array.shape, array.dtype.name
    ((3, 4, 5), 'int16')
"""

from __future__ import annotations

import io
import json
import zlib
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pyarrow as pa

from lymphatlas_ds.errors import IntegrityError, SchemaError

if TYPE_CHECKING:
    import nibabel as nib


def _nibabel() -> Any:
    """nibabel, imported on first use: importing it (and the pydicom it pulls in) takes about 1 s, which a
    patch read from the decoded cache never needs (it would delay the first patch of every fresh process)."""
    import nibabel

    return nibabel

try:  # ISA-L's deflate: 3-4x zlib's speed at level 1-2, same format (the builder extra installs it)
    from isal import isal_zlib as _zlib
    from isal.igzip import IGzipFile as _GzipFile
except ImportError:  # pragma: no cover - plain zlib reads and writes the same cells, slower
    from gzip import GzipFile as _GzipFile
    _zlib = zlib  # type: ignore[assignment]

NIFTI_SUFFIX = ".nii"
GZIP_SUFFIX = ".gz"
GZIP_LEVEL = 1
"""Deflate level of the cells (ISA-L levels 0-3; measured in benchmarks/bench_shards.py: level 1 is
within 4 % of zstd-3's bytes at a fraction of its time; higher levels barely shrink noisy volumes)."""
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's window bits for a gzip stream
_CHUNK = 16 * 2**20  # bytes inflated at a time: no whole-volume temporary
AFFINE_KEY = "lymphatlas_affine_ras"
"""Key of the JSON comment extension that carries the float64 affine (NIfTI-1's sform is float32)."""
_COMMENT_CODE = 6  # NIFTI_ECODE_COMMENT


def cell_path(case_id: str, name: str) -> str:
    """The ``path`` of a Nifti cell: ``cell_path("LA-1", "ct") == "LA-1_ct.nii.gz"``."""
    return f"{case_id}_{name}{NIFTI_SUFFIX}{GZIP_SUFFIX}"


def encode_volume(
    array_zyx: np.ndarray, affine_ras: np.ndarray, name: str, *, level: int | None = GZIP_LEVEL
) -> dict[str, Any]:
    """Turn a ``[z, y, x]`` array and its RAS affine into a ``datasets.Nifti`` cell.

    ``name`` becomes the cell's ``path`` (``.nii.gz``, or ``.nii`` with ``level=None``, is appended
    when missing); use :func:`cell_path` for shard rows. The bytes are gzip at ``level`` (a
    ``memoryview`` of the compressed stream, not copied into ``bytes``), or with ``level=None`` an
    uncompressed NIfTI file (``bytes``). The dtype is kept as given (no scaling), so decoding returns the
    identical voxels. The output is deterministic: the same inputs give the same bytes.

    Example:
        >>> cell = encode_volume(np.ones((2, 2, 2), np.uint8), np.eye(4), "x_label")
        >>> sorted(cell)
        ['bytes', 'path']
    """
    image = _nifti_image(array_zyx, affine_ras, name)
    if level is None:
        path = name if name.endswith(NIFTI_SUFFIX) else name + NIFTI_SUFFIX
        return {"bytes": image.to_bytes(), "path": path}
    out = io.BytesIO()
    _gzip_nifti(image, level, out)
    # A view of the stream's own buffer: getvalue() would copy it (one more cell in memory at the peak).
    return {"bytes": out.getbuffer(), "path": _gzip_path(name)}


def encode_volume_to(out: BinaryIO, array_zyx: np.ndarray, affine_ras: np.ndarray, name: str) -> str:
    """Write the bytes of :func:`encode_volume`'s gzip cell to the binary stream ``out`` as they are
    compressed (no cell in memory: the builder streams a large PET into a file); return the cell's ``path``.

    Example:
        >>> out = io.BytesIO()
        >>> encode_volume_to(out, np.ones((2, 2, 2), np.uint8), np.eye(4), "x_label")
        'x_label.nii.gz'
        >>> out.getvalue() == bytes(encode_volume(np.ones((2, 2, 2), np.uint8), np.eye(4), "x_label")["bytes"])
        True
    """
    _gzip_nifti(_nifti_image(array_zyx, affine_ras, name), GZIP_LEVEL, out)
    return _gzip_path(name)


def _gzip_path(name: str) -> str:
    suffix = NIFTI_SUFFIX + GZIP_SUFFIX
    return name if name.endswith(suffix) else name.removesuffix(NIFTI_SUFFIX) + suffix


def _nifti_image(array_zyx: np.ndarray, affine_ras: np.ndarray, name: str) -> nib.Nifti1Image:
    """The NIfTI-1 image of a cell: sform = qform (code 1), no scaling, the exact affine in a comment extension."""
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise SchemaError(f"volume {name!r}: expected a 3-D [z, y, x] array, got shape {array_zyx.shape}")
    affine = np.asarray(affine_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise SchemaError(f"volume {name!r}: expected a 4x4 affine, got shape {affine.shape}")
    nib = _nibabel()
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
    return image


def _gzip_nifti(image: nib.Nifti1Image, level: int, out: BinaryIO) -> None:
    """Write ``gzip(image.to_bytes())`` to ``out`` through a gzip stream: the voxels go out in nibabel's
    chunks, so no raw copy of the volume is made. No file name and mtime 0 in the gzip header: the same
    volume gives the same bytes."""
    with _GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0, filename="") as stream:
        image.to_file_map(image.make_file_map({"image": stream, "header": stream}))


def _inflate(buffer: memoryview, where: Any) -> memoryview:
    """Gunzip a cell into a writable buffer of its own, in chunks (the size comes from the gzip trailer)."""
    size = int.from_bytes(buffer[-4:], "little")  # ISIZE: the size mod 2**32
    out = np.empty(size, np.uint8)
    inflate = _zlib.decompressobj(_GZIP_WBITS)
    pos = 0
    try:
        for start in range(0, len(buffer), _CHUNK):
            piece: Any = buffer[start:start + _CHUNK]
            while piece and not inflate.eof:
                part = inflate.decompress(piece, _CHUNK)
                if pos + len(part) > size:
                    pos = -1
                    break
                out[pos:pos + len(part)] = np.frombuffer(part, np.uint8)
                pos += len(part)
                piece = inflate.unconsumed_tail
            if inflate.eof or pos < 0:
                break
    except _zlib.error as e:
        raise IntegrityError(f"Nifti cell {where!r} is not valid gzip ({e}): the shard is corrupt; re-download "
                             "or re-copy the release, then run `lymphatlas verify`") from e
    if pos != size or not inflate.eof or inflate.unused_data:
        # a volume of 4 GiB or more (ISIZE wraps), concatenated gzip members, or a truncated cell
        try:
            return memoryview(zlib.decompress(bytes(buffer), _GZIP_WBITS))
        except zlib.error as e:
            raise IntegrityError(f"Nifti cell {where!r} is not valid gzip ({e}): the shard is corrupt; re-download "
                             "or re-copy the release, then run `lymphatlas verify`") from e
    return memoryview(out)


def decode_volume(
    cell: dict[str, Any] | bytes | memoryview, *, copy: bool = True, where: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(array_zyx, affine_ras)`` from a Nifti cell (or its bytes).

    Accepts the gzipped NIfTI-1 bytes written by :func:`encode_volume`, uncompressed NIfTI bytes
    (``level=None``, and releases before the gzip cells), or any buffer such as
    ``pyarrow.BinaryScalar.as_buffer()``. A gzip cell is inflated into a new buffer that the
    returned (writable) array owns. An uncompressed cell is copied with ``copy=True``; with
    ``copy=False`` the returned array is then a read-only view of the given buffer (no voxel copy):
    keep the buffer alive while using it. ``where`` names the cell in errors (default: its path).

    Example:
        >>> cell = encode_volume(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4), "p")
        >>> float(decode_volume(cell)[0][1, 1, 1])
        7.0
    """
    data: Any = cell.get("bytes") if isinstance(cell, dict) else cell
    where = (cell.get("path") if isinstance(cell, dict) else None) if where is None else where
    if data is None:
        raise SchemaError(f"Nifti cell {where!r} has no bytes; releases embed the volume bytes in the shard")
    buffer = memoryview(data).cast("B")
    owned = False
    if bytes(buffer[:2]) == _GZIP_MAGIC:
        buffer, owned = _inflate(buffer, where), True
    try:
        header = _nibabel().Nifti1Header.from_fileobj(io.BytesIO(buffer[:348]), check=True)
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
    elif not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="), copy=True)
    elif copy and not owned:
        array = array.copy()
    return array, affine


def _exact_affine(buffer: memoryview, offset: int, sform: np.ndarray) -> np.ndarray:
    """The float64 affine of the comment extension when present and consistent with the sform."""
    if offset <= 352:
        return sform
    try:
        header = _nibabel().Nifti1Header.from_fileobj(io.BytesIO(buffer[:offset]), check=False)
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
