"""``ddep export``: a checkpoint to safetensors + JSON config, smp's own folder for smp models, and
optionally ONNX.

What export writes into ``output``, and nothing else: ``config.json``, ``model.safetensors``,
``smp/`` (``config.json``, ``model.safetensors``, ``README.md``: smp's ``save_pretrained`` layout,
smp models only), ``model.onnx`` and, for a model over 1.5 GiB of weights only, ``model.onnx.data``,
and for a model of a ddep fine-tuning run a copy of its ``train_split.txt`` (``ddep evaluate``
refuses those images).

* Every check runs before anything is written: the checkpoint, ``onnx_size``, the ONNX trace
  itself, and the output folder.
* The output folder must be missing, empty, or hold only export's own names (an earlier export):
  such a folder is written over without asking, as ``save_pretrained`` does. Anything else in it
  (in ``smp/`` too) is refused, one line naming the files, unless ``overwrite=true``; even then those
  files are kept: export replaces its own names one file at a time and deletes no folder but its
  own (an emptied ``smp/``, its temporaries). A run's own ``model/`` folder is refused too, unless
  ``overwrite=true``: its metrics.json describes what is there.
  An own name taken by a folder (or ``smp`` taken by a file) is refused even with ``overwrite=true``.
* Own files this export does not write again (``model.onnx`` when ``onnx=false``, ``smp/`` for a
  non-smp model, ``model.onnx.data`` beside a self-contained ``model.onnx``) belong to an earlier
  model: they are removed, and each removal is printed. So are the hidden temporaries of an
  interrupted export (``.model.onnx.partial-PID.data`` of earlier ddep versions, ``.NAME.tmpPID``,
  ``.smp.partial-PID/``), once their process is gone.
* Each file appears whole or not at all (written under a temporary name, then renamed); a failure,
  a full disk say, removes the temporaries and raises ``OSError`` naming the path. Files are
  created with the umask's permissions (0644 under umask 022), smp's weights included.
* ``model.onnx`` is self-contained, so copying the printed files anywhere gives a loadable model;
  past 1.5 GiB of weights (protobuf's limit is 2 GiB) the weights go to ``model.onnx.data``, which
  ``model.onnx`` names as such (copy both).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import fsync_dir, process_alive, write_atomic, write_error
from ..choices import listed
from ..data.splits import TRAIN_RECORD, read_train_record
from ..models.saving import CONFIG_FILE, WEIGHTS_FILE, load_model, pretraining_result, save_model
from ..models.segmenter import SegmentationModel
from ..models.smp_models import SmpModel, save_smp

SMP_FOLDER = "smp"
ONNX_FILE = "model.onnx"
ONNX_DATA = ONNX_FILE + ".data"
#: Files export writes at the top of its folder, and in ``smp/`` (smp's ``save_pretrained``).
OWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, ONNX_FILE, ONNX_DATA, TRAIN_RECORD)
SMP_FILES = ("config.json", "model.safetensors", "README.md")
#: Weights up to this size go inside ``model.onnx`` (protobuf refuses messages over 2 GiB); torch's own threshold.
ONNX_SINGLE_FILE_BYTES = 1536 * 2**20
#: Loggers that report every pass of the ONNX translation and optimisation at INFO (~130 lines).
ONNX_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
#: Temporaries of an interrupted export: write_atomic's, this module's and earlier ddep versions' (the last
#: group is the writing process's id).
LEFTOVER = re.compile(r"\.(?:(?:config\.json|model\.safetensors|model\.onnx)\.tmp|model\.onnx\.partial-|smp\.partial-)(\d{1,9})(?:\.data)?")


def check_onnx_size(model: SegmentationModel, size: Any) -> tuple[int, int]:
    """``onnx_size`` as (height, width): two positive multiples of the model's ``input_divisor``."""
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"onnx_size must be two positive integers [height, width], got {size!r}")
    height, width = size
    divisor = model.input_divisor
    if height % divisor or width % divisor:
        up = [-(-s // divisor) * divisor for s in size]
        raise ValueError(f"onnx_size={[height, width]}: {model.config['arch']} needs multiples of {divisor} (e.g. onnx_size={up})")
    return height, width


@contextlib.contextmanager
def quiet_onnx(verbose: bool = False) -> Iterator[None]:
    """Hide the exporter's INFO lines and warnings, unless ``verbose``."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ONNX_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(torch\.onnx|torch\.export|onnxscript|onnx_ir)")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def trace_onnx(model: SegmentationModel, size: tuple[int, int], verbose: bool = False) -> Any:
    """The ONNX program (``onnx_ir.Model``) by torch.export (``dynamo=True``; the TorchScript exporter is
    deprecated), traced at ``size`` (height, width), batch size dynamic; nothing is written."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch.export's ONNX translator)
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx and onnxscript packages: pip install 'ddep[onnx]'") from None
    height, width = check_onnx_size(model, size)
    with quiet_onnx(verbose):
        program = torch.onnx.export(
            model.eval(), (torch.zeros(1, 3, height, width),), None, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, verbose=verbose,
        )
    return program.model


def write_onnx(graph: Any, path: str | os.PathLike) -> list[Path]:
    """Write an ``onnx_ir.Model`` as ``path``, self-contained; past ``ONNX_SINGLE_FILE_BYTES`` of weights,
    with them in ``path`` + ``.data``, named so in the model. Returns the paths written."""
    import onnx_ir

    path = Path(path)
    weights = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
    if weights <= ONNX_SINGLE_FILE_BYTES:
        data = onnx_ir.to_proto(graph).SerializeToString()
        return [write_atomic(path, lambda f: f.write(data))]
    data_path = path.with_name(path.name + ".data")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        onnx_ir.save(graph, partial / path.name, external_data=data_path.name)
        for name in (data_path.name, path.name):
            with open(partial / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(partial / data_path.name, data_path)  # the weights first: the new model.onnx never meets old ones
        os.replace(partial / path.name, path)
    except OSError as e:
        raise write_error(e, path) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(path.parent)
    return [path, data_path]


def survey_output(output: Path, writes_smp: bool, writes_onnx: bool, writes_record: bool,
                  overwrite: bool) -> tuple[list[Path], list[Path]]:
    """Check ``output`` before anything is written (see the module's docstring); return the own files this export
    leaves stale and the leftover temporaries of dead processes, both to be removed after it."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file; output= takes a folder")
    if not output.is_dir():
        return [], []
    run = output.parent
    if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir() and not overwrite:
        raise ValueError(f"output {output} is the result of the run {run} (its metrics.json describes it): export into "
                         "another folder, or pass overwrite=true to replace it")
    foreign: list[str] = []
    clashes: list[Path] = []
    own: list[Path] = []
    leftovers: list[Path] = []
    for entry in sorted(output.iterdir()):
        name = entry.name
        leftover = LEFTOVER.fullmatch(name)
        if name in OWN_FILES:
            (clashes if entry.is_dir() and not entry.is_symlink() else own).append(entry)
        elif name == SMP_FOLDER and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                if inner.name in SMP_FILES and not (inner.is_dir() and not inner.is_symlink()):
                    own.append(inner)
                elif inner.name in SMP_FILES and writes_smp:
                    clashes.append(inner)
                else:
                    foreign.append(f"{SMP_FOLDER}/{inner.name}{'/' if inner.is_dir() else ''}")
        elif name == SMP_FOLDER and writes_smp:
            clashes.append(entry)
        elif leftover and not process_alive(int(leftover[1])) and (entry.is_file() or _only_files(entry)):
            leftovers.append(entry)
        else:
            foreign.append(name + ("/" if entry.is_dir() else ""))
    if clashes:
        kind = "a file" if clashes[0].name == SMP_FOLDER else "a folder"
        raise ValueError(f"{clashes[0]} is {kind} where export writes {'a folder' if kind == 'a file' else 'a file'}; "
                         "move it away or choose another output folder")
    if foreign and not overwrite:
        raise ValueError(
            f"output {output} holds {len(foreign)} file{'s' * (len(foreign) > 1)} that export did not write ({listed(foreign)}); "
            "export writes only into an empty folder or an earlier export's: choose another output, or pass overwrite=true "
            "to write its own files beside them (they are kept)")
    written = {output / CONFIG_FILE, output / WEIGHTS_FILE, *([output / TRAIN_RECORD] if writes_record else [])}
    if writes_onnx:
        written |= {output / ONNX_FILE, output / ONNX_DATA}  # model.onnx.data: rewritten, or removed once model.onnx is
    if writes_smp:
        written |= {output / SMP_FOLDER / name for name in SMP_FILES}
    stale = [path for path in own if path not in written]
    return stale, leftovers


def _only_files(folder: Path) -> bool:
    """A leftover folder (smp's or ONNX's temporary) holds plain files only."""
    return folder.is_dir() and not folder.is_symlink() and all(p.is_file() and not p.is_symlink() for p in folder.iterdir())


def export(config: dict[str, Any]) -> Path:
    if not config["checkpoint"] or not config["output"]:
        raise ValueError("export needs checkpoint=PATH and output=FOLDER")
    verbose, overwrite = bool(config.get("verbose", False)), bool(config.get("overwrite", False))
    output = Path(config["output"])
    model = load_model(config["checkpoint"]).eval()
    writes_smp = isinstance(model, SmpModel)
    record = read_train_record(config["checkpoint"])  # the training split goes along, for ddep evaluate's check
    survey_output(output, writes_smp, bool(config["onnx"]), record is not None, overwrite)  # refuse before the slow trace, too
    graph = trace_onnx(model, config["onnx_size"], verbose) if config["onnx"] else None
    stale, leftovers = survey_output(output, writes_smp, graph is not None, record is not None, overwrite)

    pretrained = pretraining_result(config["checkpoint"])  # said in the weights' header: evaluate and predict refuse it
    save_model(model, output, stage="pretrain" if pretrained else None)
    written = [output / WEIGHTS_FILE, output / CONFIG_FILE]
    if record is not None:
        text = record[0].read_text()
        written.append(write_atomic(output / TRAIN_RECORD, lambda f: f.write(text.encode())))
    print(f"exported to {output} ({', '.join(map(str, written))})")
    if pretrained:
        print(f"a denoising-pretraining result: fine-tune it (ddep finetune init={output} ...) before evaluating or "
              "predicting with it")
    if writes_smp:
        folder = save_smp(model, output / SMP_FOLDER)
        print(f"smp model (segmentation_models_pytorch.from_pretrained): {folder} "
              f"({', '.join(str(folder / name) for name in SMP_FILES if (folder / name).is_file())})")
    if graph is not None:
        paths = write_onnx(graph, output / ONNX_FILE)
        print(f"ONNX: {', '.join(map(str, paths))}")
        if len(paths) == 1 and (output / ONNX_DATA).exists():
            stale.append(output / ONNX_DATA)  # an earlier model's weights: the new model.onnx does not name them
    for path in stale:
        path.unlink(missing_ok=True)
        print(f"removed {path} (an earlier export's; this one did not write it)")
    smp = output / SMP_FOLDER
    if not writes_smp and smp.is_dir() and not any(smp.iterdir()):
        smp.rmdir()
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if leftovers:
        print(f"removed {len(leftovers)} temporary file{'s' * (len(leftovers) > 1)} of an interrupted export from {output} "
              f"({listed([p.name for p in leftovers])})")
    return output
