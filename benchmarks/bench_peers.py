"""The project's patch loader against the peers a user would choose from, in one run on the same cases.

Builds a fake WORK of full-size cases (``--patients 3``: 4 cases of CT 250 x 512 x 512 at
0.98 x 0.98 x 3 mm, PET on the CT grid as in a release; ``--quick``: small cases and 32^3 patches)
and its release, then for each loader measures the same 128^3 CT+PET+label patches of the
release's train split (a third foreground-centred where the loader can, batch size 2):

- **project**: ``load_lymphatlas(patch_size=128)``, its decoded cache built by ``prepare()``, in a
  ``DataLoader(collate_fn=lymphatlas_ds.loader.collate)`` (the patches decompressed into the batch);
  **project_default**: the same with torch's default collate (``torch.stack`` of the items);
- **nnU-Net**: ``lymphatlas materialize --nnunet``, ``nnUNetv2_plan_and_preprocess -c 3d_fullres``,
  then nnU-Net's own ``nnUNetDataLoader`` on the preprocessed blosc2 files (2 workers: its
  ``NonDetMultiThreadedAugmenter``, as its trainer runs it; no augmentation anywhere);
- **MONAI PersistentDataset / CacheDataset**: ``lymphatlas materialize --monai`` NIfTI,
  ``LoadImaged`` (CT+PET as two channels) then ``RandSpatialCropd`` (uniform crops, no foreground
  oversampling), each case listed once per patch;
- **TorchIO Queue**: the same NIfTI as ``Subject``s, ``Queue(UniformSampler(128))`` (2 workers: the
  Queue's own ``num_workers``, the outer ``DataLoader`` has none).

Columns: one-time preparation (what runs once per release: cache build, materialize + plan and
preprocess, materialize); epoch 0 (the first epoch in a fresh process, after the imports:
opening, lazy caching, CacheDataset's loading); steady patches/s in one process and with 2
workers (after the first batch, at least ``--steady-s`` seconds of batches); the first patch in a fresh process (after the imports); the
peak RSS of that one-process run; the bytes the loader reads in training. Each peer's line also gives
``cpu_ms1``, the one-process run's CPU time per patch (all its threads). Every process is a
fresh ``python``, the loaders run one after another, and the load average is printed with each.

    python benchmarks/bench_peers.py                       # 4 full-size cases (about 30-60 min on 2 loaded cores)
    python benchmarks/bench_peers.py --patients 9          # 12 cases (every third patient has 2 exams)
    python benchmarks/bench_peers.py --quick               # small cases, 32^3 patches: a check that it runs
    python benchmarks/bench_peers.py --keep /tmp/peers     # keep (and reuse) the generated data
    python benchmarks/bench_peers.py --peers project,nnunet --rounds 3   # in turns, 3 rounds, medians
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lymphatlas_ds._io import peak_rss_bytes  # noqa: E402

PEERS = ("project", "project_default", "nnunet", "monai_persistent", "monai_cache", "torchio")
TITLES = {
    "project": "LymphAtlas `load_lymphatlas` + `collate` (decoded cache)",
    "project_default": "LymphAtlas `load_lymphatlas`, torch's default collate",
    "nnunet": "nnU-Net `nnUNetDataLoader` (preprocessed)",
    "monai_persistent": "MONAI `PersistentDataset`",
    "monai_cache": "MONAI `CacheDataset`",
    "torchio": "TorchIO `Queue` (UniformSampler)",
}
QUICK = {"shape": (48, 96, 96), "patch": 32, "samples": 4, "patients": 3}
FULL = {"shape": (250, 512, 512), "patch": 128, "samples": 8, "patients": 3}
DATASET_ID = 501


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "nnUNet_raw": str(work / "nnunet_raw"),
            "nnUNet_preprocessed": str(work / "nnunet_pre"), "nnUNet_results": str(work / "nnunet_results"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


# ----------------------------------------------------------------------------- one-time preparation


def make_release(work: Path, shape: tuple[int, int, int], patients: int) -> float:
    from builder.release.build import build_release
    from lymphatlas_synth.fake_work import make_fake_work

    t = time.perf_counter()
    make_fake_work(work / "work", n_patients=patients, seed=0, shape_zyx=shape, spacing_xyz=(0.98, 0.98, 3.0))
    build_release(work / "work", work / "release", version="1.0.0")
    return time.perf_counter() - t


def prepare(peer: str, work: Path, timings: dict[str, float]) -> dict:
    """Run ``peer``'s one-time preparation; its time and the bytes its loader reads."""
    from lymphatlas_ds.reader import Release

    release = Release(work / "release")
    t = time.perf_counter()
    if peer in ("project", "project_default"):
        from lymphatlas_ds.loader import load_lymphatlas

        if "project_prep" in timings:  # the other project row: the same cache
            return {"prep_s": timings["project_prep"], "disk": dir_size(work / "cache" / "1.0.0")}
        shutil.rmtree(work / "cache", ignore_errors=True)
        load_lymphatlas(work / "release", cache_dir=work / "cache", patch_size=8, progress=False).prepare()
        timings["project_prep"] = time.perf_counter() - t
        return {"prep_s": timings["project_prep"], "disk": dir_size(work / "cache" / "1.0.0")}
    if peer == "nnunet":
        from lymphatlas_ds.nnunet import materialize_nnunet

        for name in ("nnunet_raw", "nnunet_pre"):
            shutil.rmtree(work / name, ignore_errors=True)
        materialize_nnunet(release, work / "nnunet_raw", dataset_id=DATASET_ID, preprocessed_dir=work / "nnunet_pre")
        timings["nnunet_materialize"] = time.perf_counter() - t
        exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
        proc = subprocess.run([str(exe), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2",
                               "--no_pbar"], env=_env(work), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        pre = next((work / "nnunet_pre").glob(f"Dataset{DATASET_ID}_*"))
        return {"prep_s": time.perf_counter() - t, "disk": dir_size(pre / "nnUNetPlans_3d_fullres"),
                "raw_disk": dir_size(work / "nnunet_raw")}
    if peer in ("monai_persistent", "monai_cache", "torchio"):
        if "materialize_monai" not in timings:
            from lymphatlas_ds.monai_datalist import materialize_monai

            shutil.rmtree(work / "monai", ignore_errors=True)
            materialize_monai(release, work / "monai")
            timings["materialize_monai"] = time.perf_counter() - t
        prep = timings["materialize_monai"]
        nifti = dir_size(work / "monai" / "imagesTr") + dir_size(work / "monai" / "labelsTr")
        if peer == "monai_persistent":
            shutil.rmtree(work / "monai_persistent", ignore_errors=True)
        return {"prep_s": prep, "disk": nifti}  # PersistentDataset's cache is added after its run
    raise ValueError(peer)


# ----------------------------------------------------------------------------- loaders (in the probe process)


def _train_cases(work: Path) -> list[dict]:
    datalist = json.loads((work / "monai" / "datalist.json").read_text())
    return [{"image": [str(work / "monai" / p) for p in d["image"]], "label": str(work / "monai" / d["label"]),
             "case_id": d["case_id"]} for d in datalist["training"]]


def _project_batches(peer: str, work: Path, *, workers: int, size: tuple[int, int, int], samples: int):
    """Batches of the project's load_lymphatlas patches (see :func:`batches`)."""
    from torch.utils.data import DataLoader

    from lymphatlas_ds.loader import collate, load_lymphatlas

    ds = load_lymphatlas(work / "release", cache_dir=work / "cache", patch_size=size, samples_per_case=samples,
                         progress=False)
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        collate_fn=collate if peer == "project" else None)
    epoch = 0
    while True:
        ds.set_epoch(epoch)
        yield from loader
        epoch += 1


def _nnunet_batches(peer: str, work: Path, *, workers: int, size: tuple[int, int, int], samples: int):
    """Batches of nnU-Net's own nnUNetDataLoader on its preprocessed files (see :func:`batches`)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pre = next((work / "nnunet_pre").glob(f"Dataset{DATASET_ID}_*"))
    folder = pre / "nnUNetPlans_3d_fullres"
    label_manager = PlansManager(str(pre / "nnUNetPlans.json")).get_label_manager(load_json(str(pre / "dataset.json")))
    data = nnUNetDatasetBlosc2(str(folder), nnUNetDatasetBlosc2.get_identifiers(str(folder)))
    loader = nnUNetDataLoader(data, 2, size, size, label_manager, oversample_foreground_percent=0.33)
    if workers:
        import multiprocessing

        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

        # Forked producers hung here (in threadpoolctl's limits, torch imported by the parent): spawn them.
        multiprocessing.set_start_method("spawn", force=True)
        loader = NonDetMultiThreadedAugmenter(loader, None, workers, num_cached=max(2, workers * 2),
                                              seeds=None, pin_memory=False)
    while True:
        yield next(loader)


def _monai_batches(peer: str, work: Path, *, workers: int, size: tuple[int, int, int], samples: int):
    """Batches of MONAI's PersistentDataset or CacheDataset (see :func:`batches`)."""
    from torch.utils.data import DataLoader

    import numpy as np
    from monai.data import CacheDataset, PersistentDataset
    from monai.transforms import Compose, LoadImaged, RandSpatialCropd
    from torch.utils.data import Subset

    cases = _train_cases(work)
    load = [LoadImaged(keys="image", dtype=np.float32, ensure_channel_first=True, image_only=True),
            LoadImaged(keys="label", dtype=np.uint8, ensure_channel_first=True, image_only=True)]
    # One crop per item, each case listed `samples` times (RandSpatialCropSamplesd(num_samples=8) copied the
    # whole case per sample: the full-size run was killed at 14 GB).
    crop = RandSpatialCropd(keys=["image", "label"], roi_size=size, random_size=False)
    transform = Compose([*load, crop])
    if peer == "monai_persistent":
        ds = PersistentDataset(cases, transform, cache_dir=work / "monai_persistent")
    else:
        ds = CacheDataset(cases, transform, num_workers=1, progress=False)
    ds = Subset(ds, [i for i in range(len(cases)) for _ in range(samples)])
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    while True:
        yield from loader


def _torchio_batches(peer: str, work: Path, *, workers: int, size: tuple[int, int, int], samples: int):
    """Batches of a TorchIO Queue (see :func:`batches`)."""
    from torch.utils.data import DataLoader

    import torchio as tio

    subjects = [tio.Subject(ct=tio.ScalarImage(c["image"][0]), pet=tio.ScalarImage(c["image"][1]),
                            label=tio.LabelMap(c["label"])) for c in _train_cases(work)]
    queue = tio.Queue(tio.SubjectsDataset(subjects), max_length=max(8, 2 * samples), samples_per_volume=samples,
                      sampler=tio.UniformSampler(size), num_workers=workers, shuffle_subjects=True,
                      shuffle_patches=True, verbose=False)
    loader = DataLoader(queue, batch_size=2, num_workers=0)
    while True:
        yield from loader


def batches(peer: str, work: Path, *, workers: int, patch: int, samples: int):
    """An endless stream of batches of ``peer`` (dicts with an ``image``/``data`` tensor)."""
    size = (patch,) * 3
    if peer in ("project", "project_default"):
        return _project_batches(peer, work, workers=workers, size=size, samples=samples)
    if peer == "nnunet":
        return _nnunet_batches(peer, work, workers=workers, size=size, samples=samples)
    if peer in ("monai_persistent", "monai_cache"):
        return _monai_batches(peer, work, workers=workers, size=size, samples=samples)
    if peer == "torchio":
        return _torchio_batches(peer, work, workers=workers, size=size, samples=samples)
    raise ValueError(peer)


def _count(batch) -> int:
    """Patches in a batch, and read one value per 4 KiB page of its tensors (as a copy to the GPU would)."""
    n = 0
    for key in ("image", "data", "ct"):
        if key in batch:
            value = batch[key]["data"] if isinstance(batch[key], dict) else batch[key]
            n = int(value.shape[0])
            break
    for value in batch.values():
        value = value.get("data") if isinstance(value, dict) else value
        if hasattr(value, "reshape") and hasattr(value, "element_size") and value.numel():
            value.reshape(-1)[:: max(1, 4096 // value.element_size())].sum()
    return n


def probe(peer: str, work: Path, *, workers: int, patch: int, samples: int, n_cases: int, steady_s: float) -> dict:
    """In a fresh process: the first patch, epoch 0 and a steady epoch; with ``workers``, only the steady epoch."""
    import torch  # noqa: F401 - imported before the clock starts, as every peer needs it

    per_epoch = n_cases * samples
    t = time.perf_counter()
    stream = batches(peer, work, workers=workers, patch=patch, samples=samples)
    got = _count(next(stream))
    first = time.perf_counter() - t
    while got < per_epoch:
        got += _count(next(stream))
    epoch0 = time.perf_counter() - t
    t, cpu, got = time.perf_counter(), time.process_time(), 0
    while got < per_epoch or time.perf_counter() - t < steady_s:
        got += _count(next(stream))
    rate = got / (time.perf_counter() - t)
    # CPU time of this process (all its threads) per patch: less sensitive to the machine's load than the
    # rate, which also counts a loader's extra threads winning it a larger share of a busy machine.
    cpu_ms = (time.process_time() - cpu) / got * 1e3
    out = {"first_s": first, "epoch0_s": epoch0, "rate": rate, "rss": peak_rss_bytes(), "load": os.getloadavg()[0],
           "cpu_ms": cpu_ms}
    print(json.dumps(out), flush=True)
    import multiprocessing

    # The peers' worker pools (batchgenerators' producers, persistent DataLoader workers) are killed, not shut
    # down politely: a spawned producer left behind would keep this probe's stdout open.
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(0)


def scaling(work: Path, *, patch: int, samples: int, repeats: int) -> None:
    """The project's patches through ``DataLoader(num_workers=k)``, k = 0, 1, 2, the recommended ``collate``
    and torch's default one, in turns in this one process (``bench_loader.worker_scaling``: persistent workers,
    each steady epoch timed whole, ratios to the same repeat's ``num_workers=0``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_loader import worker_scaling

    from lymphatlas_ds.loader import collate, load_lymphatlas

    ds = load_lymphatlas(work / "release", cache_dir=work / "cache", patch_size=(patch,) * 3,
                         samples_per_case=2 * samples, progress=False)
    ds.prepare()
    for name, fn in (("collate", collate), ("default collate", None)):
        print(f"project, {name}: ", end="", flush=True)
        worker_scaling(ds, workers=(0, 1, 2), repeats=repeats, collate_fn=fn, persistent=True)


def run_probe(peer: str, work: Path, args, n_cases: int, *, workers: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", peer, "--work", str(work), "--workers", str(workers),
           "--patch", str(args.patch), "--samples", str(args.samples), "--cases", str(n_cases),
           "--steady-s", str(args.steady_s)]
    proc = subprocess.run(cmd, env=_env(work), capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{peer} (workers={workers}) failed with exit status {proc.returncode} (-9: killed, "
                           f"e.g. out of memory):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the table


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:.1f} MiB"


def table(rows: dict[str, dict], patch: int) -> str:
    base = rows.get("nnunet", {}).get("rate1")
    head = ("| loader | one-time preparation | epoch 0 | steady patches/s, one process | with 2 workers | "
            "first patch, fresh process | peak RSS, one process | bytes the loader reads |")
    lines = [head, "|" + "---|" * 8]
    for peer, r in rows.items():
        vs = f" ({r['rate1'] / base:.2f}x nnU-Net)" if base and peer != "nnunet" else ""
        lines.append(
            f"| {TITLES[peer]} | {r['prep_s']:.{0 if r['prep_s'] >= 10 else 1}f} s | {r['epoch0_s']:.1f} s | {r['rate1']:.1f}{vs} | "
            f"{r['rate2']:.1f} ({r['rate2'] / r['rate1']:.2f}x) | {r['first_s']:.2f} s | {_size(r['rss'])} | "
            f"{_size(r['disk'])} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cases and 32^3 patches: checks that it runs")
    parser.add_argument("--patients", type=int, default=None, help="patients of the fake WORK (every third has 2 exams)")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder, keep it and reuse its release")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per probe process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="probe every peer this many times, in turns (after preparing them all); medians")
    parser.add_argument("--steady-s", type=float, default=3.0,
                        help="the steady rate counts at least this many seconds of batches (and one epoch)")
    parser.add_argument("--scaling", type=int, default=5, metavar="REPEATS",
                        help="then the project's DataLoader at 0, 1, 2 workers in turns in one process, each "
                             "path REPEATS epochs (0: skip)")
    parser.add_argument("--probe", choices=(*PEERS, "scaling"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--patch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _median(runs: list[dict], key: str) -> float:
    import statistics

    return float(statistics.median(r[key] for r in runs))


def _print_sizes(rows: dict[str, dict], timings: dict[str, float], release_bytes: int) -> None:
    print(f"release (shards) {release_bytes / 2**30:.2f} GiB"
          + (f"; project cache {rows['project']['disk'] / release_bytes:.2f}x the release" if "project" in rows else "")
          + (f"; nnU-Net raw (.nii.gz) {rows['nnunet']['raw_disk'] / 2**30:.2f} GiB, materialize "
             f"{timings['nnunet_materialize']:.0f} s of its preparation" if "nnunet" in rows else "")
          + (f"; MONAI/TorchIO NIfTI written by materialize --monai in {timings['materialize_monai']:.0f} s"
             if "materialize_monai" in timings else ""))


def _measure_peers(peers: list[str], work: Path, args: argparse.Namespace, n_cases: int, timings: dict[str, float],
                   failed: list[str]) -> dict[str, dict]:
    """Every peer prepared, then probed (one process and 2 workers) ``args.rounds`` times in turns; the rows of
    the table (medians over the rounds), each printed as measured. A peer that fails is added to ``failed``."""
    rows: dict[str, dict] = {}
    preps = {peer: prepare(peer, work, timings) for peer in peers} if args.rounds > 1 else {}
    runs: dict[str, list[tuple[dict, dict]]] = {peer: [] for peer in peers}
    for r in range(args.rounds):
        # In turns, every other round backwards: each peer meets the machine's load as the others do.
        for peer in peers if r % 2 == 0 else peers[::-1]:
            if peer in failed:
                continue
            if peer not in preps:
                preps[peer] = prepare(peer, work, timings)
            try:
                one = run_probe(peer, work, args, n_cases, workers=0)
                two = run_probe(peer, work, args, n_cases, workers=2)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # a peer that fails is reported, not fatal
                print(f"{peer}: failed: {str(e).splitlines()[0]}", flush=True)
                failed.append(peer)
                continue
            runs[peer].append((one, two))
            if args.rounds > 1:
                print(f"round {r + 1} {peer}: one process {one['rate']:.1f}/s (CPU {one['cpu_ms']:.1f} ms/patch, "
                      f"load {one['load']:.1f}), 2 workers {two['rate']:.1f}/s (load {two['load']:.1f})", flush=True)
    for peer in peers:
        if not runs[peer] or peer in failed:
            continue
        ones, twos = [o for o, _ in runs[peer]], [t for _, t in runs[peer]]
        row = dict(preps[peer])
        row.update(first_s=_median(ones, "first_s"), epoch0_s=_median(ones, "epoch0_s"),
                   rate1=_median(ones, "rate"), rss=max(o["rss"] for o in ones), rate2=_median(twos, "rate"),
                   cpu_ms1=_median(ones, "cpu_ms"))
        if peer == "monai_persistent":
            row["disk"] = dir_size(work / "monai_persistent")
        rows[peer] = row
        loads = "; ".join(f"{o['load']:.1f} / {t['load']:.1f}" for o, t in runs[peer])
        print(f"{peer}: {json.dumps({k: round(v, 3) for k, v in row.items()})} (load {loads})"
              + (f" (medians of {len(ones)} rounds; peak RSS the largest)" if len(ones) > 1 else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.probe:
        if args.probe == "scaling":
            scaling(args.work, patch=args.patch, samples=args.samples, repeats=args.workers)
        else:
            probe(args.probe, args.work, workers=args.workers, patch=args.patch, samples=args.samples,
                  n_cases=args.cases, steady_s=args.steady_s)
        return 0
    size = QUICK if args.quick else FULL
    args.patch = args.patch or size["patch"]
    args.samples = args.samples or size["samples"]
    peers = [p for p in args.peers.split(",") if p]
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        built = None
        if not (work / "release" / "manifest.json").exists():
            built = make_release(work, size["shape"], args.patients or size["patients"])
        from lymphatlas_ds.loader import select_cases
        from lymphatlas_ds.reader import Release

        release = Release(work / "release")
        n_cases = len(select_cases(release))
        release_bytes = dir_size(work / "release")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
              f"load average at start {os.getloadavg()[0]:.1f}")
        print(f"cases: {n_cases} training cases of {size['shape']} voxels (z, y, x; 0.98 x 0.98 x 3 mm), "
              f"{args.patch}^3 patches, {args.samples} per case per epoch, batch size 2"
              + (f"; fake WORK + release built in {built:.0f} s" if built is not None else ""))
        timings: dict[str, float] = {}
        failed: list[str] = []
        rows = _measure_peers(peers, work, args, n_cases, timings, failed)
        if args.scaling and "project" in peers:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", "scaling", "--work", str(work),
                   "--workers", str(args.scaling), "--patch", str(args.patch), "--samples", str(args.samples)]
            proc = subprocess.run(cmd, env=_env(work), capture_output=True, text=True, timeout=args.timeout)
            print(proc.stdout.strip() or f"scaling failed: {proc.stderr[-2000:]}", flush=True)
            if proc.returncode:
                failed.append("scaling")
        print()
        print(table(rows, args.patch))
        print()
        _print_sizes(rows, timings, release_bytes)
        if failed:
            print(f"failed (see above): {', '.join(failed)}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
