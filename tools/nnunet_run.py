"""Drive nnU-Net v2 through its Python API: plan + preprocess, train one fold, predict.

Why the API as well as nnU-Net's ``nnUNetv2_train`` / ``nnUNetv2_predict`` commands: those look
the trainer up by importing every trainer module of nnunetv2 (one imports ``timm``), and they find
the project's trainers only after ``python -m lymphatlas_ds.nnunet_trainers`` has run
(:mod:`lymphatlas_ds.nnunet_trainers`; tested through the commands in tests/test_nnunet_cli.py).
The API needs neither step and takes any trainer class (:mod:`tools.trainers`) for training *and*
prediction.

Every function that starts nnU-Net worker processes must be called under
``if __name__ == "__main__":`` in a script: nnU-Net uses "spawn" pools, which re-import the main module.

Example:
    >>> set_nnunet_env("nnunet_work")  # doctest: +SKIP
    >>> plan_and_preprocess(501)  # doctest: +SKIP
    >>> fold_dir = train_fold(501, 0, trainer="tiny", device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

NNUNET_DIRS = {"nnUNet_raw": "nnUNet_raw", "nnUNet_preprocessed": "nnUNet_preprocessed", "nnUNet_results": "nnUNet_results"}


def set_nnunet_env(work: str | os.PathLike, *, n_proc_da: int | None = None) -> dict[str, Path]:
    """Point nnU-Net's three folders into ``work`` (the one place that sets nnU-Net's variables).

    nnunetv2 reads ``nnUNet_raw`` etc. from the environment each time it needs them, so this works
    after nnunetv2 is imported too. ``n_proc_da`` sets the number of augmentation workers.
    """
    work = Path(work).resolve()
    paths = {}
    for var, sub in NNUNET_DIRS.items():
        paths[var] = work / sub
        paths[var].mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(paths[var])
    if n_proc_da is not None:
        os.environ["nnUNet_n_proc_DA"] = str(n_proc_da)
    return paths


def dataset_name(dataset_id: int) -> str:
    """``Dataset<ID>_<Name>`` as nnU-Net resolves it from its folders."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(int(dataset_id))


def plan_and_preprocess(
    dataset_id: int, *, configurations: Sequence[str] = ("3d_fullres",), num_processes: int = 2,
    verify: bool = True,
) -> Path:
    """``nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity -c ...``; returns the preprocessed folder.

    The integrity check raises (nnU-Net asserts) on missing channels, shape or spacing mismatches and
    unexpected label values; PET finiteness is checked earlier by the materializer.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    extract_fingerprints([int(dataset_id)], num_processes=num_processes, check_dataset_integrity=verify,
                         clean=True, verbose=False)
    plans_identifier = plan_experiments([int(dataset_id)])
    preprocess([int(dataset_id)], plans_identifier, configurations=tuple(configurations),
               num_processes=(num_processes,) * len(configurations), verbose=False)
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset_name(dataset_id)
    if not (folder / "splits_final.json").is_file():
        logger.warning("%s has no splits_final.json: nnU-Net will draw random per-case folds", folder)
    return folder


def _device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu for a smoke run")
    return torch.device(device)


def trainer_output_dir(dataset_id: int, trainer: str, *, configuration: str = "3d_fullres",
                       plans_identifier: str = "nnUNetPlans") -> Path:
    """nnU-Net's results folder of one trainer / plans / configuration (holds fold_k/)."""
    from tools.trainers import resolve_trainer

    cls = resolve_trainer(trainer)
    return (Path(os.environ["nnUNet_results"]) / dataset_name(dataset_id)
            / f"{cls.__name__}__{plans_identifier}__{configuration}")


def train_fold(
    dataset_id: int, fold: int, *, trainer: str = "nnUNetTrainer", configuration: str = "3d_fullres",
    device: str = "cuda", plans_identifier: str = "nnUNetPlans", epochs: int | None = None,
    iterations: int | None = None, val_iterations: int | None = None, skip_existing: bool = False,
) -> Path:
    """Train one fold and run nnU-Net's validation (``fold_k/validation/summary.json``); returns ``fold_k``.

    ``epochs`` / ``iterations`` override the trainer's numbers (set before ``initialize`` so the
    polynomial learning-rate schedule spans the shortened run). With ``skip_existing`` a fold whose
    summary.json exists is left alone.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from tools.trainers import resolve_trainer

    cls = resolve_trainer(trainer)
    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name(dataset_id)
    plans = load_json(str(pre / f"{plans_identifier}.json"))
    plans["continue_training"] = False  # read (and popped) by nnUNetTrainer.__init__
    dataset_json = load_json(str(pre / "dataset.json"))
    out = trainer_output_dir(dataset_id, trainer, configuration=configuration,
                             plans_identifier=plans_identifier) / f"fold_{fold}"
    if skip_existing and (out / "validation" / "summary.json").is_file():
        logger.info("fold %d: %s exists, skipped", fold, out / "validation" / "summary.json")
        return out
    t = cls(plans=plans, configuration=configuration, fold=int(fold), dataset_json=dataset_json, device=_device(device))
    if epochs is not None:
        t.num_epochs = int(epochs)
    if iterations is not None:
        t.num_iterations_per_epoch = int(iterations)
    if val_iterations is not None:
        t.num_val_iterations_per_epoch = int(val_iterations)
    t.run_training()
    t.perform_actual_validation(False)
    return Path(t.output_folder)


def load_predictor(
    model_dir: str | os.PathLike, *, folds: Sequence[int | str] = (0,), checkpoint_name: str = "checkpoint_final.pth",
    trainer: str | None = None, device: str = "cuda", use_mirroring: bool = False,
):
    """An ``nnUNetPredictor`` for a trained model folder, whatever module its trainer class lives in.

    nnU-Net's ``initialize_from_trained_model_folder`` finds the trainer class by its name in
    nnunetv2 only (see the module docstring); this does the same steps with
    :func:`tools.trainers.resolve_trainer` (or ``trainer`` when given) and then hands the network to
    ``nnUNetPredictor.manual_initialization``. Several folds make an ensemble, as in nnU-Net.
    """
    import inspect

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from tools.trainers import resolve_trainer

    model_dir = Path(model_dir)
    dataset_json = load_json(str(model_dir / "dataset.json"))
    plans_manager = PlansManager(load_json(str(model_dir / "plans.json")))
    parameters, trainer_name, configuration_name, mirror_axes = [], None, None, None
    for i, f in enumerate(folds):
        path = model_dir / f"fold_{f}" / checkpoint_name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint; train fold {f} first (tools/train_baseline.py)")
        checkpoint = torch.load(str(path), map_location=torch.device("cpu"), weights_only=False)
        if i == 0:
            trainer_name = checkpoint["trainer_name"]
            configuration_name = checkpoint["init_args"]["configuration"]
            mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
        parameters.append(checkpoint["network_weights"])
    cls = resolve_trainer(trainer or trainer_name)
    if cls.__name__ != trainer_name:
        logger.warning("checkpoint was written by %s; building its network with %s", trainer_name, cls.__name__)
    configuration_manager = plans_manager.get_configuration(configuration_name)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    if "plans_manager" not in inspect.signature(cls.build_network_architecture).parameters:
        raise RuntimeError(f"{cls.__name__}.build_network_architecture has nnU-Net's old signature; update it")
    network = cls.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                             enable_deep_supervision=False)
    network.load_state_dict(parameters[0])
    dev = _device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    cls.__name__, mirror_axes)
    return predictor


def predict_folder(
    model_dir: str | os.PathLike, images_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
    folds: Sequence[int | str] = (0,), trainer: str | None = None, device: str = "cuda", use_mirroring: bool = False,
    num_processes: int = 1,
) -> Path:
    """Segment every case in ``images_dir`` (``<case>_0000`` CT, ``<case>_0001`` PET) into ``output_dir``."""
    predictor = load_predictor(model_dir, folds=folds, trainer=trainer, device=device, use_mirroring=use_mirroring)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files(str(images_dir), str(output_dir), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
    return output_dir


def training_log(checkpoint: str | os.PathLike) -> dict[str, list]:
    """The per-epoch values nnU-Net keeps in a checkpoint (losses, pseudo Dice, lr, epoch times)."""
    import torch

    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    return ckpt["logging"]


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
